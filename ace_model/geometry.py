"""Grid-wise view sampling, overlap masks and composition/decomposition targets (docs/model.md,
"Geometry conventions").

Conventions (all row-major, row first): a *cell* is one `cell x cell` pixel square of the base
image; offsets are in cells. View L spans 2n x 2n cells and is downsampled by 2 to n*cell pixels,
so each L token covers a 2x2 cell block; view S spans n x n cells, one cell per token.
Token index t = r * n + c with r the row.

The reference implementation built the masks transposed (docs/model.md, bug Q1). Here every mask and
target is derived directly from the offsets and unit-tested against pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ace_model.errors import InputError

DECOMP_RADIUS = 2  # 5x5 Gaussian window on the fine grid
COMP_RADIUS = 1  # 3x3 Gaussian window on the coarse grid


@dataclass(frozen=True)
class ViewPair:
    """Cell offsets of the two views inside the base grid."""

    xl: int  # row offset of L
    yl: int  # column offset of L
    xs: int  # row offset of S (same parity as xl)
    ys: int  # column offset of S (same parity as yl)

    @property
    def dr(self) -> int:
        return self.xs - self.xl

    @property
    def dc(self) -> int:
        return self.ys - self.yl

    def as_array(self) -> np.ndarray:
        return np.array([self.xl, self.yl, self.xs, self.ys], dtype=np.int64)


def sample_pair(rng: np.random.Generator, grid: int, n: int) -> ViewPair:
    """Draw parity-aligned offsets so that every L token coincides with a 2x2 block of S."""
    xl, yl = (int(v) for v in rng.integers(0, grid - 2 * n + 1, size=2))
    xs = int(rng.choice(np.arange(xl % 2, grid - n + 1, 2)))
    ys = int(rng.choice(np.arange(yl % 2, grid - n + 1, 2)))
    return ViewPair(xl, yl, xs, ys)


def _in_range(values: np.ndarray, upper: int) -> np.ndarray:
    return (values >= 0) & (values < upper)


def overlap_masks(pair: ViewPair, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean token masks (n*n,) of L and S marking tokens inside the shared region."""
    idx = np.arange(n)
    s_rows = _in_range(idx + pair.dr, 2 * n)
    s_cols = _in_range(idx + pair.dc, 2 * n)
    l_rows = _in_range(idx - pair.dr // 2, n // 2)
    l_cols = _in_range(idx - pair.dc // 2, n // 2)
    mask_l = np.outer(l_rows, l_cols).ravel()
    mask_s = np.outer(s_rows, s_cols).ravel()
    return mask_l, mask_s


def _grid_coords(side: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.divmod(np.arange(side * side), side)
    return rows, cols


def _gaussian_rows(
    centre_r: np.ndarray, centre_c: np.ndarray, side: int, radius: int, row_mask: np.ndarray
) -> np.ndarray:
    """One row per centre: exp(-d^2/2) on the (2r+1)^2 window around it on a side x side grid."""
    rows, cols = _grid_coords(side)
    dr = rows[None, :] - centre_r[:, None]  # (N, side*side)
    dc = cols[None, :] - centre_c[:, None]
    window = (np.abs(dr) <= radius) & (np.abs(dc) <= radius) & row_mask[:, None]
    return np.where(window, np.exp(-(dr**2 + dc**2) / 2.0), 0.0).astype(np.float32)


def decomposition_target(pair: ViewPair, n: int) -> np.ndarray:
    """T_dec (n*n, 4n*n): S token (i, j) <-> L fine position (i + dr, j + dc)."""
    i, j = _grid_coords(n)
    _, mask_s = overlap_masks(pair, n)
    return _gaussian_rows(i + pair.dr, j + pair.dc, 2 * n, DECOMP_RADIUS, mask_s)


def composition_target(pair: ViewPair, n: int) -> np.ndarray:
    """T_comp (n*n, n*n/4): L token (p, q) <-> S coarse position (p - dr/2, q - dc/2)."""
    p, q = _grid_coords(n)
    mask_l, _ = overlap_masks(pair, n)
    return _gaussian_rows(p - pair.dr // 2, q - pair.dc // 2, n // 2, COMP_RADIUS, mask_l)


def cut_views(base: np.ndarray, pair: ViewPair, cell: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut L and S from a base image (H, W, ...) on cell boundaries.

    L is downsampled by an exact 2x2 mean so that its token grid stays aligned with the cells
    (equivalent to OpenCV bilinear at scale 1/2, without its rounding questions).
    """
    big = base[
        pair.xl * cell : (pair.xl + 2 * n) * cell, pair.yl * cell : (pair.yl + 2 * n) * cell
    ].astype(np.float32)
    side = n * cell
    large = big.reshape(side, 2, side, 2, *big.shape[2:]).mean(axis=(1, 3))
    small = base[pair.xs * cell : (pair.xs + n) * cell, pair.ys * cell : (pair.ys + n) * cell]
    return large, small.astype(np.float32)


def check_geometry(grid: int, n: int) -> None:
    """Raise if some offsets could produce views that do not overlap."""
    if n < 2:
        raise InputError(f"n (tokens per view side) must be at least 2, got {n}")
    if n % 2:
        raise InputError(f"n must be even, got {n}")
    if grid < 2 * n or grid >= 3 * n:
        raise InputError(f"need 2n <= grid < 3n for guaranteed overlap; got grid={grid}, n={n}")
