"""Correspondence on patch grids: query sampling, similarity maps, mutual-NN check, sub-patch peak.

All coordinates here are continuous *grid* coordinates (x = column, y = row, patch centres at
integers); `preprocess.CoordinateMap` converts them to and from original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Located:
    xy: np.ndarray  # (N, 2) refined grid coordinates of the best match in the target
    score: np.ndarray  # (N,) cosine similarity at the best patch
    mutual: np.ndarray  # (N,) bool: the target patch's best match in the query is the query patch
    patch: np.ndarray  # (N, 2) integer (row, col) of the best target patch


def sample_grid(grid: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of a unit-norm grid (h, w, D) at grid coords (N, 2) -> (N, D), re-normalised."""
    h, w, _ = grid.shape
    norm_x = (xy[:, 0] + 0.5) / w * 2 - 1  # grid coords -> [-1, 1] with align_corners=False
    norm_y = (xy[:, 1] + 0.5) / h * 2 - 1
    where = torch.stack([norm_x, norm_y], dim=-1).view(1, 1, -1, 2).to(grid.dtype)
    sampled = F.grid_sample(grid.permute(2, 0, 1)[None], where, mode="bilinear",
                            padding_mode="border", align_corners=False)  # (1, D, 1, N)
    return F.normalize(sampled[0, :, 0].T, dim=-1)


def similarity_maps(queries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of queries (N, D) with every patch of target (h, w, D) -> (N, h, w)."""
    return torch.einsum("nd,hwd->nhw", queries.float(), target.float())


def refine_peak(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sub-patch peak by a separable quadratic fit on the 3x3 neighbourhood -> (N, 2) grid (x, y).

    The offset along each axis is (s[-1] - s[+1]) / (2 (s[-1] - 2 s[0] + s[+1])), clipped to
    half a patch; at the border the integer peak is kept along that axis.
    """
    n, h, w = sim.shape
    idx = torch.arange(n)

    def offset(prev: torch.Tensor, centre: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        curvature = prev - 2 * centre + nxt
        safe = torch.where(curvature < -1e-8, curvature, torch.full_like(curvature, -1.0))
        delta = (prev - nxt) / (2 * safe)
        return torch.where(curvature < -1e-8, delta.clamp(-0.5, 0.5), torch.zeros_like(delta))

    centre = sim[idx, rows, cols]
    up, down = sim[idx, (rows - 1).clamp(min=0), cols], sim[idx, (rows + 1).clamp(max=h - 1), cols]
    left, right = sim[idx, rows, (cols - 1).clamp(min=0)], sim[idx, rows, (cols + 1).clamp(max=w - 1)]
    inner_r = (rows > 0) & (rows < h - 1)
    inner_c = (cols > 0) & (cols < w - 1)
    dy = torch.where(inner_r, offset(up, centre, down), torch.zeros_like(centre))
    dx = torch.where(inner_c, offset(left, centre, right), torch.zeros_like(centre))
    return torch.stack([cols.float() + dx, rows.float() + dy], dim=-1)


def locate(
    query_grid: torch.Tensor,
    query_xy: np.ndarray,
    target_grid: torch.Tensor,
    target_valid: torch.Tensor | None = None,
) -> Located:
    """Find each query point (grid coords in the query) in the target grid.

    query_grid, target_grid: (h, w, D) unit-norm patch embeddings; target_valid: (h, w) bool,
    False for letterbox padding (never a match).
    """
    xy = torch.as_tensor(np.asarray(query_xy, dtype=np.float32)).reshape(-1, 2)
    queries = sample_grid(query_grid.float(), xy)  # (N, D)
    sim = similarity_maps(queries, target_grid)  # (N, h, w)
    if target_valid is not None:
        sim = sim.masked_fill(~target_valid[None].bool(), -2.0)
    w = sim.shape[2]
    best = sim.flatten(1).argmax(1)
    rows, cols = best // w, best % w
    score = sim.flatten(1).gather(1, best[:, None])[:, 0]
    refined = refine_peak(sim, rows, cols)
    mutual = _mutual(query_grid, target_grid, xy, rows, cols)
    return Located(refined.numpy(), score.numpy(), mutual.numpy(),
                   torch.stack([rows, cols], -1).numpy())


def _mutual(
    query_grid: torch.Tensor, target_grid: torch.Tensor, xy: torch.Tensor,
    rows: torch.Tensor, cols: torch.Tensor,
) -> torch.Tensor:
    """Back-match each found target patch into the query; mutual if it lands on the query patch."""
    h, w, _ = query_grid.shape
    back = target_grid[rows, cols].float() @ query_grid.float().flatten(0, 1).T  # (N, h*w)
    back_best = back.argmax(1)
    q_rows = xy[:, 1].round().long().clamp(0, h - 1)
    q_cols = xy[:, 0].round().long().clamp(0, w - 1)
    return back_best == q_rows * w + q_cols
