"""Correspondence on patch grids: query sampling (points and boxes), similarity maps, sub-cell peak,
and the two-level matcher `match_points` that /match, /heatmap, index-hit location and `ace eval`
share.

All coordinates here are continuous *grid* coordinates (x = column, y = row, patch centres at
integers); `preprocess.CoordinateMap` converts them to and from original pixels. Each image is
embedded once (one forward pass) and every query point is answered from the two grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ace_model.preprocess import CoordinateMap

Refinement = Literal["quadratic", "none"]
REFINEMENTS: tuple[Refinement, ...] = ("quadratic", "none")
MASKED = -2.0  # below any cosine similarity, so padding never wins the argmax


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


# ---------------------------------------------------------------------------------------------
# Two levels, coarse to fine: the matcher the service, `ace eval` and the viewer share.
#
# Coordinates are model pixels of the letterboxed image at the encoder's img_size ("base" size);
# a level of stride s has cell (r, c) centred at ((c + 0.5) s, (r + 0.5) s).

Mode = Literal["both", "coarse", "fine"]
MODES: tuple[Mode, ...] = ("both", "coarse", "fine")


@dataclass(frozen=True)
class Levels:
    """One image's embeddings, as the encoder gave them for an input of `side` px."""

    coarse: torch.Tensor  # (h, w, D) unit-norm
    fine: torch.Tensor | None  # (H, W, d) unit-norm; None for single-level encoders
    side: int  # input side in px these grids were computed from
    content: tuple[float, float, float, float]  # image content (x0, y0, x1, y1) in these px
    coords: CoordinateMap | None = None  # its letterbox transform (None: a plain `side` px image)

    @classmethod
    def of(cls, coarse: torch.Tensor, fine: torch.Tensor | None, coords: CoordinateMap) -> Levels:
        """The levels of one image embedded at coords.size px (its letterbox transform)."""
        return cls(coarse, fine, coords.size, coords.content_box(), coords)

    def from_level(self, other: Levels, px: torch.Tensor) -> torch.Tensor:
        """px (N, 2) of `other` (the same image at another input size) -> px of this embedding.
        Through original pixels: each size is letterboxed on its own, and rounding the content
        size and padding differs by up to a pixel from a plain rescale."""
        if self.coords is None or other.coords is None:
            return px * (self.side / other.side)
        original = other.coords.to_original(px.double().numpy())
        return torch.from_numpy(self.coords.to_model(original)).float()

    def valid(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, cols) bool: cell centres on image content, not letterbox padding. Along an axis
        where no centre is on content (an image thinner than a cell), the cells it overlaps."""
        stride = self.side / grid.shape[0]
        x0, y0, x1, y1 = self.content
        rows = _on_content(grid.shape[0], stride, y0, y1)
        return rows[:, None] & _on_content(grid.shape[1], stride, x0, x1)[None, :]


def _on_content(cells: int, stride: float, low: float, high: float) -> torch.Tensor:
    starts = torch.arange(cells, dtype=torch.float32) * stride
    centres = starts + stride / 2
    inside = (centres >= low) & (centres <= high)
    return inside if bool(inside.any()) else (starts + stride > low) & (starts < high)


@dataclass(frozen=True)
class MatchOptions:
    mode: Mode = "both"  # which levels vote: coarse only, fine only, or both
    coarse_weight: float = 0.5  # weight of the upsampled coarse map in "both"
    refine: Refinement = "quadratic"  # sub-cell peak on the finest map used
    look_min_confidence: float = 0.5  # only confident first answers get the second looks: an
    # ambiguous one (a uniform shaft, a flat field) would only slide along its ambiguity
    second_look_radius: float = 12.0  # a look searches 2x this many of its own px around the
    # previous answer: 12 base px at a 2x look, 6 at a 4x look (each narrows as it sharpens)
    confidence_tau: float = 0.02  # softmax temperature of the confidence
    confidence_radius: float = 6.0  # base px: probability mass within this of the peak = confidence

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown matching mode {self.mode!r}; choose one of {MODES}")


@dataclass(frozen=True)
class Found:
    xy: np.ndarray  # (N, 2) target model px (base size) of each match
    score: np.ndarray  # (N,) combined cosine similarity at the match
    confidence: np.ndarray  # (N,) softmax mass around the peak, in [0, 1]
    mutual: np.ndarray  # (N,) bool: matching back from the target lands on the query


def sample_at(grid: torch.Tensor, xy_px: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear, re-normalised features of a grid (h, w, D) at px (N, 2) of a `side` px input."""
    return sample_grid(grid.float(), xy_px / (side / grid.shape[0]) - 0.5)


def box_vectors(grid: torch.Tensor, boxes: np.ndarray, coords: CoordinateMap) -> torch.Tensor:
    """A box's query vector: the normalised mean of the coarse cells whose centres lie inside it,
    always including the cell under its centre. grid (h, w, D), boxes (N, 4) original px -> (N, D)."""
    centres = coords.patch_centres()  # (h*w, 2) original px
    x, y = centres[None, :, 0], centres[None, :, 1]
    inside = (x >= boxes[:, 0:1]) & (x <= boxes[:, 2:3]) & (y >= boxes[:, 1:2]) & (y <= boxes[:, 3:4])
    centre_cell = coords.patch_of((boxes[:, :2] + boxes[:, 2:]) / 2)  # (N, 2) row, col
    inside[np.arange(len(boxes)), centre_cell[:, 0] * coords.grid + centre_cell[:, 1]] = True
    flat = grid.flatten(0, 1)  # (h*w, D)
    return F.normalize(torch.from_numpy(inside).to(flat.dtype) @ flat, dim=-1)


def _level_map(grid: torch.Tensor, vector: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cosine map of vectors (N, D) over grid (h, w, D), bilinearly resized to size -> (N, H, W)."""
    sim = similarity_maps(vector, grid)
    if tuple(sim.shape[1:]) == size:
        return sim
    return F.interpolate(sim[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass(frozen=True)
class Maps:
    combined: torch.Tensor  # (N, H, W) what the argmax runs on (coarse + fine), padding MASKED
    sharp: torch.Tensor  # (N, H, W) what the sub-cell refinement runs on: the fine map alone
    stride: float  # target px per cell of these maps


def _fine_near(queries: torch.Tensor, fine: torch.Tensor, centre_px: torch.Tensor, radius_px: float,
               stride: float) -> torch.Tensor:
    """The fine similarity map (N, H, W) only where a second look can use it: the cells within
    radius_px of each centre (N, 2) px and one more cell around them (the sub-cell fit's
    neighbours); MASKED elsewhere. A look's window is a few dozen cells of its H x W: the full maps
    were most of a request's matching time."""
    h, w, _ = fine.shape
    reach = int(np.ceil(radius_px / stride)) + 2  # cells from the centre's cell to the crop's edge
    span = torch.arange(-reach, reach + 1)
    centre_cell = torch.floor(centre_px / stride).long()  # (N, 2) col, row
    rows = (centre_cell[:, 1:2] + span).clamp(0, h - 1)  # (N, k): clamped duplicates rewrite a cell
    cols = (centre_cell[:, 0:1] + span).clamp(0, w - 1)
    crops = fine[rows[:, :, None], cols[:, None, :]]  # (N, k, k, d)
    sims = torch.einsum("nd,nijd->nij", queries.float(), crops.float())
    out = torch.full((len(queries), h, w), MASKED)
    out[torch.arange(len(queries))[:, None, None], rows[:, :, None], cols[:, None, :]] = sims
    return out


def similarity(query: Levels, query_px: torch.Tensor, target: Levels, options: MatchOptions,
               query_coarse: torch.Tensor | None = None,
               near: tuple[torch.Tensor, float] | None = None) -> Maps:
    """Similarity maps of the query points (N, 2) px of `query` over the target, on the finest
    grid used. The upsampled coarse map decides *which* peak; it is smooth at the fine scale and
    would pull the sub-cell fit towards its own cell centres, so the fine map alone refines it.
    near (centres (N, 2) px, radius px): only those windows will be searched, so the fine map is
    computed there alone (_fine_near)."""
    use_fine = options.mode != "coarse" and query.fine is not None and target.fine is not None
    grid = target.fine if use_fine and target.fine is not None else target.coarse
    size = (int(grid.shape[0]), int(grid.shape[1]))
    coarse_q = sample_at(query.coarse, query_px, query.side) if query_coarse is None else query_coarse
    if not use_fine or query.fine is None or target.fine is None:
        sim = sharp = _level_map(target.coarse, coarse_q, size)
    else:
        fine_q = sample_at(query.fine, query_px, query.side)
        sharp = _level_map(target.fine, fine_q, size) if near is None else \
            _fine_near(fine_q, target.fine, near[0], near[1], target.side / size[0])
        w = 0.0 if options.mode == "fine" else options.coarse_weight
        sim = sharp if w == 0 else w * _level_map(target.coarse, coarse_q, size) + (1 - w) * sharp
    padding = ~target.valid(grid)[None]
    return Maps(sim.masked_fill(padding, MASKED), sharp.masked_fill(padding, MASKED), target.side / size[0])


def _peak(maps: Maps, refine: Refinement,
          window: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of the combined maps, refined on the sharp ones -> px (N, 2) and the peak score (N,).
    window (N, H, W) bool restricts the search."""
    combined = maps.combined if window is None else maps.combined.masked_fill(~window, MASKED)
    rows, cols = argmax_2d(combined)
    score = combined[torch.arange(combined.shape[0]), rows, cols]
    return (refine_peak(maps.sharp, rows, cols, refine) + 0.5) * maps.stride, score


def _near(maps: Maps, centre_px: torch.Tensor, radius_px: float) -> torch.Tensor:
    """(N, H, W) bool: cells within radius_px of each map's centre (N, 2) px."""
    h, w = maps.combined.shape[1:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * maps.stride
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * maps.stride
    dist2 = (xs[None, None, :] - centre_px[:, 0, None, None]) ** 2 + \
        (ys[None, :, None] - centre_px[:, 1, None, None]) ** 2
    return dist2 <= radius_px**2


def _confidence(maps: Maps, peak_px: torch.Tensor, options: MatchOptions) -> torch.Tensor:
    """Softmax probability mass within confidence_radius of the peak: near 1 for one sharp peak."""
    sim = maps.combined
    prob = torch.softmax(sim.flatten(1) / options.confidence_tau, dim=1).view_as(sim)
    return (prob * _near(maps, peak_px, options.confidence_radius)).flatten(1).sum(1).clamp(0, 1)


def _first_pass(query: Levels, query_px: torch.Tensor, target: Levels, options: MatchOptions,
                query_coarse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    maps = similarity(query, query_px, target, options, query_coarse)
    peak, score = _peak(maps, options.refine)
    # the window sits on the argmax cell's centre: the sub-cell fit may move the answer by up to
    # half a cell, further than the radius on a coarse map
    rows, cols = argmax_2d(maps.combined)
    cell = (torch.stack([cols, rows], dim=-1).float() + 0.5) * maps.stride
    return peak, score, _confidence(maps, cell, options)


def _look_again(query: tuple[Levels, Levels], query_px: torch.Tensor, target: tuple[Levels, Levels],
                previous_px: torch.Tensor, options: MatchOptions, query_coarse: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Search higher-resolution embeddings (query[1], target[1]) only around the previous answer;
    px of the base embeddings (query[0], target[0]) in and out."""
    (q_base, q_hi), (t_base, t_hi) = query, target
    radius = options.second_look_radius * 2  # look px: 12 base px at 2x, 6 at 4x
    centre = t_hi.from_level(t_base, previous_px)
    maps = similarity(q_hi, q_hi.from_level(q_base, query_px), t_hi, options, query_coarse, (centre, radius))
    peak, score = _peak(maps, options.refine, _near(maps, centre, radius))
    return t_base.from_level(t_hi, peak), score


Look = tuple[Levels, Levels]  # (query, target) embedded at a higher resolution
LOOK_SCALES = (2, 4)  # the second looks, in multiples of the encoder's img_size


def look_scales(width: int, height: int, img_size: int, max_scale: int = 4) -> tuple[int, ...]:
    """The looks worth taking for an image: up to its own resolution (a 512 px image gains
    nothing from an 896 px look), at most max_scale (1 = no second look)."""
    longest = max(width, height)
    return tuple(s for s in LOOK_SCALES if s <= max_scale and img_size * s <= 1.25 * longest)


def common_looks(query: Sequence[Levels], target: Sequence[Levels]) -> list[Look]:
    """Pair up the looks both images have, by input side."""
    by_side = {levels.side: levels for levels in target}
    return [(q, by_side[q.side]) for q in query if q.side in by_side]


def match_points(
    query: Levels, query_px: np.ndarray, target: Levels, options: MatchOptions | None = None,
    second_look: Look | Sequence[Look] | None = None, query_coarse: torch.Tensor | None = None,
    query_boxes: np.ndarray | None = None,
) -> Found:
    """Locate query points (N, 2) base px of `query` in `target`, coarse to fine.

    second_look: (query, target) embedded at a higher resolution (or several such looks, in
    increasing resolution); each confident answer is searched again in a window around the
    previous one.
    query_coarse (N, D) replaces the sampled coarse query vectors (a box's mean); query_boxes
    (N, 4) base px then define mutuality. Confidence and mutuality come from the first pass.
    """
    options = options or MatchOptions()
    xy = torch.as_tensor(np.asarray(query_px, dtype=np.float32)).reshape(-1, 2)
    found, score, confidence = _first_pass(query, xy, target, options, query_coarse)
    confident = confidence >= options.look_min_confidence
    for look_query, look_target in _looks(second_look) if options.mode != "coarse" else []:
        looked, look_score = _look_again((query, look_query), xy, (target, look_target), found, options,
                                         query_coarse)
        take = confident & (look_score > MASKED)  # a window all padding keeps the previous answer
        found = torch.where(take[:, None], looked, found)
        score = torch.where(take, look_score, score)
    back, _, _ = _first_pass(target, found, query, options, None)
    return Found(found.numpy().astype(np.float64), score.numpy(), confidence.numpy(),
                 _is_mutual(back.numpy(), np.asarray(query_px, float).reshape(-1, 2), query, query_boxes))


def _looks(second_look: Look | Sequence[Look] | None) -> list[Look]:
    if not second_look:
        return []
    if isinstance(second_look[0], Levels):
        return [second_look]  # type: ignore[list-item]
    return list(second_look)  # type: ignore[arg-type]


def _is_mutual(back_px: np.ndarray, query_px: np.ndarray, query: Levels,
               boxes: np.ndarray | None) -> np.ndarray:
    """The back-match lands within one coarse cell of the query point (or inside its box)."""
    cell = query.side / query.coarse.shape[0]
    if boxes is None:
        return np.linalg.norm(back_px - query_px, axis=1) <= cell
    inside_x = (back_px[:, 0] >= boxes[:, 0] - cell / 2) & (back_px[:, 0] <= boxes[:, 2] + cell / 2)
    return inside_x & (back_px[:, 1] >= boxes[:, 1] - cell / 2) & (back_px[:, 1] <= boxes[:, 3] + cell / 2)


def refine_near(query: Levels, query_px: np.ndarray, target: Levels, around_px: np.ndarray,
                radius_px: float, options: MatchOptions | None = None,
                query_coarse: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best match of each query point (N, 2) within radius_px of a known position (N, 2) in the
    target (base px) -> (N, 2) base px and (N,) score: how a retrieval hit, found on the coarse
    grid, is located at fine precision in its own image."""
    options = options or MatchOptions()
    xy = torch.as_tensor(np.asarray(query_px, dtype=np.float32)).reshape(-1, 2)
    centre = torch.as_tensor(np.asarray(around_px, dtype=np.float32)).reshape(-1, 2)
    maps = similarity(query, xy, target, options, query_coarse)
    peak, score = _peak(maps, options.refine, _near(maps, centre, radius_px))
    return peak.numpy().astype(np.float64), score.numpy()
