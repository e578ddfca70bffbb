"""Correspondence on patch grids: query sampling, similarity maps, mutual-NN check, sub-patch peak.

All coordinates here are continuous *grid* coordinates (x = column, y = row, patch centres at
integers); `preprocess.CoordinateMap` converts them to and from original pixels. Each image is
embedded once (one forward pass) and every query point is answered from the two grids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Refinement = Literal["quadratic", "none"]
REFINEMENTS: tuple[Refinement, ...] = ("quadratic", "none")
MASKED = -2.0  # below any cosine similarity, so padding never wins the argmax


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


def argmax_2d(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, h, w) -> integer (rows, cols) of each map's maximum."""
    best = sim.flatten(1).argmax(1)
    return best // sim.shape[2], best % sim.shape[2]


def _parabola_offset(prev: torch.Tensor, centre: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through (-1, prev), (0, centre), (1, nxt); 0 where not a maximum."""
    curvature = prev - 2 * centre + nxt
    is_peak = curvature < -1e-8
    safe = torch.where(is_peak, curvature, torch.full_like(curvature, -1.0))
    delta = (prev - nxt) / (2 * safe)
    return torch.where(is_peak, delta.clamp(-0.5, 0.5), torch.zeros_like(delta))


def _axis_offset(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, axis: int) -> torch.Tensor:
    """Parabola offset along rows (axis 0) or cols (axis 1); 0 when a neighbour is off-grid or masked."""
    n, h, w = sim.shape
    idx = torch.arange(n)
    size, pos = (h, rows) if axis == 0 else (w, cols)
    before, after = (pos - 1).clamp(min=0), (pos + 1).clamp(max=size - 1)
    if axis == 0:
        prev, nxt = sim[idx, before, cols], sim[idx, after, cols]
    else:
        prev, nxt = sim[idx, rows, before], sim[idx, rows, after]
    centre = sim[idx, rows, cols]
    usable = (pos > 0) & (pos < size - 1) & (prev > MASKED) & (nxt > MASKED)
    return torch.where(usable, _parabola_offset(prev, centre, nxt), torch.zeros_like(centre))


def refine_quadratic(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sub-patch peak by a separable quadratic fit on the 3x3 neighbourhood -> (N, 2) grid (x, y).

    The offset along each axis is (s[-1] - s[+1]) / (2 (s[-1] - 2 s[0] + s[+1])), clipped to
    half a patch; where a neighbour is off the grid or masked the integer peak is kept on that axis.
    """
    dy = _axis_offset(sim, rows, cols, axis=0)
    dx = _axis_offset(sim, rows, cols, axis=1)
    return torch.stack([cols.float() + dx, rows.float() + dy], dim=-1)


def refine_peak(
    sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, method: Refinement = "quadratic"
) -> torch.Tensor:
    """Sub-patch location of each map's peak at integer (rows, cols) -> (N, 2) grid (x, y)."""
    if method == "quadratic":
        return refine_quadratic(sim, rows, cols)
    if method == "none":
        return torch.stack([cols.float(), rows.float()], dim=-1)
    raise ValueError(f"unknown refinement {method!r}; choose one of {REFINEMENTS}")


def locate(
    query_grid: torch.Tensor,
    query_xy: np.ndarray,
    target_grid: torch.Tensor,
    target_valid: torch.Tensor | None = None,
    refine: Refinement = "quadratic",
) -> Located:
    """Find each query point (grid coords in the query) in the target grid.

    query_grid, target_grid: (h, w, D) unit-norm patch embeddings; target_valid: (h, w) bool,
    False for letterbox padding (never a match, never used by the refinement).
    """
    xy = torch.as_tensor(np.asarray(query_xy, dtype=np.float32)).reshape(-1, 2)
    queries = sample_grid(query_grid.float(), xy)  # (N, D)
    sim = similarity_maps(queries, target_grid)  # (N, h, w)
    if target_valid is not None:
        sim = sim.masked_fill(~target_valid[None].bool(), MASKED)
    rows, cols = argmax_2d(sim)
    score = sim[torch.arange(sim.shape[0]), rows, cols]
    refined = refine_peak(sim, rows, cols, refine)
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
