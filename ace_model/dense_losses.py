"""Losses of the two-level dense encoder, all softmax InfoNCE with targets from known geometry.

Every term has the same shape: a query embedding, a set of candidate embeddings, one positive
among them (the candidate nearest to the query's true location) and an ignore zone around the
positive (candidates so close to the truth that calling them negatives would punish precision).
    L = -log softmax(q . k / tau)[positive]   over candidates outside the ignore zone
`chance` is what a content-blind predictor scores (uniform over the kept candidates, ln K): a
term that stays there has learned nothing (shared/notes: the old element-wise BCE sat on its floor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = -1e4  # masked logits (finite, so a fully masked row gives a finite loss)


@dataclass(frozen=True)
class Term:
    loss: torch.Tensor  # scalar
    chance: float  # ln(mean number of candidates): a content-blind predictor's loss
    count: int  # queries that contributed


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
             ignore: torch.Tensor, valid: torch.Tensor, tau: float) -> Term:
    """queries (B, Q, D), candidates (B, M, D), positive (B, Q) index into M, ignore (B, Q, M) bool
    (never the positive), valid (B, Q) bool. Rows not valid do not count."""
    logits = torch.einsum("bqd,bmd->bqm", queries.float(), candidates.float()) / tau
    logits = logits.masked_fill(ignore, NEG_INF)
    if not bool(valid.any()):
        return Term(logits.sum() * 0.0, 0.0, 0)
    picked = logits[valid]  # (V, M)
    loss = F.cross_entropy(picked, positive[valid])
    kept = (~ignore[valid]).sum(-1).float().mean()
    return Term(loss, float(torch.log(kept)), int(valid.sum()))


def nearest(points: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """points (B, Q, 2), cells (B, M, 2), same (source) frame -> index (B, Q), distance (B, Q)."""
    dist = torch.cdist(points, cells)
    best = dist.min(-1)
    return best.indices, best.values


def ignore_zone(target_xy: torch.Tensor, cells: torch.Tensor, positive: torch.Tensor,
                radius: torch.Tensor) -> torch.Tensor:
    """Candidates within `radius` (B,) of the target (B, Q, 2) other than the positive -> (B, Q, M)."""
    near = torch.cdist(target_xy, cells) < radius[:, None, None]
    return near & ~F.one_hot(positive, cells.shape[1]).bool()


def gather_rows(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grid (B, M, D), index (B, Q) -> (B, Q, D)."""
    return torch.gather(grid, 1, index[..., None].expand(-1, -1, grid.shape[-1]))
