"""Geometry checked against PIXEL coordinates (docs/model.md, "Geometry conventions"
and its invariants).

The base image stores every pixel's own (row, col) in its two channels. After cutting the views,
the pixel rectangle a token covers is read back from the view pixels, never from the offset
formulas, so a transposed or shifted mask/target (the reference code's bug) cannot pass.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ace_model.config import ACEConfig, GeometryConfig, ModelConfig, cpu, full, tiny
from ace_model.geometry import (
    COMP_RADIUS,
    DECOMP_RADIUS,
    ViewPair,
    check_geometry,
    composition_target,
    cut_views,
    decomposition_target,
    overlap_masks,
    sample_pair,
)

GEOMETRIES = {"tiny": tiny().geometry, "cpu": cpu().geometry, "full": full().geometry}


def coordinate_base(geo: GeometryConfig) -> np.ndarray:
    """(H, W, 2) float32 base image: channel 0 = pixel row, channel 1 = pixel column."""
    rows, cols = np.mgrid[0 : geo.base_px, 0 : geo.base_px].astype(np.float32)
    return np.stack([rows, cols], axis=-1)


def block_rects(view: np.ndarray, block: int, halo: float) -> np.ndarray:
    """(k*k, 4) base-pixel rectangles [row_min, row_max, col_min, col_max] of block x block tiles.

    `halo` = 0.5 for the 2x-downsampled L view: a pixel there averages base coordinates
    v - 0.5 and v + 0.5, so it covers that pair of base pixels.
    """
    k = view.shape[0] // block
    tiles = view.reshape(k, block, k, block, 2)
    low, high = tiles.min(axis=(1, 3)) - halo, tiles.max(axis=(1, 3)) + halo  # (k, k, 2)
    rects = np.stack([low[..., 0], high[..., 0], low[..., 1], high[..., 1]], axis=-1)
    return rects.reshape(k * k, 4)


def inside(rects: np.ndarray, outer: np.ndarray) -> np.ndarray:
    return (
        (rects[:, 0] >= outer[0]) & (rects[:, 1] <= outer[1])
        & (rects[:, 2] >= outer[2]) & (rects[:, 3] <= outer[3])
    )


def expected_target(
    rows: np.ndarray, cols: np.ndarray, row_kept: np.ndarray, unit: float, radius: int
) -> np.ndarray:
    """exp(-d^2/2) between rectangle centres in `unit` pixels, on the (2r+1)^2 window, kept rows."""
    du = (rows[:, :2].mean(1)[:, None] - cols[:, :2].mean(1)[None, :]) / unit  # (R, C)
    dv = (rows[:, 2:].mean(1)[:, None] - cols[:, 2:].mean(1)[None, :]) / unit
    window = (np.abs(du) <= radius + 1e-6) & (np.abs(dv) <= radius + 1e-6) & row_kept[:, None]
    return np.where(window, np.exp(-(du**2 + dv**2) / 2), 0.0)


def physical_layout(geo: GeometryConfig, pair: ViewPair, base: np.ndarray) -> dict[str, np.ndarray]:
    """Every rectangle the targets talk about, read from the cut views' pixels."""
    large, small = cut_views(base, pair, geo.cell, geo.n)
    assert large.shape == small.shape == (geo.view_px, geo.view_px, 2)
    return {
        "l_tokens": block_rects(large, geo.cell, 0.5),
        "l_fine": block_rects(large, geo.cell // 2, 0.5),
        "l_extent": block_rects(large, geo.view_px, 0.5)[0],
        "s_tokens": block_rects(small, geo.cell, 0.0),
        "s_coarse": block_rects(small, 2 * geo.cell, 0.0),
        "s_extent": block_rects(small, geo.view_px, 0.0)[0],
    }


def check_pair(geo: GeometryConfig, pair: ViewPair, base: np.ndarray) -> None:
    n, cell = geo.n, geo.cell
    layout = physical_layout(geo, pair, base)
    mask_l, mask_s = overlap_masks(pair, n)
    t_dec, t_comp = decomposition_target(pair, n), composition_target(pair, n)
    assert t_dec.shape == (n * n, 4 * n * n) and t_comp.shape == (n * n, n * n // 4)

    # Masks: a token is in the overlap iff its pixel rectangle lies inside the other view.
    np.testing.assert_array_equal(mask_s, inside(layout["s_tokens"], layout["l_extent"]))
    np.testing.assert_array_equal(mask_l, inside(layout["l_tokens"], layout["s_extent"]))
    overlap_cells = _overlap_area(layout["l_extent"], layout["s_extent"]) // cell**2
    assert mask_s.sum() == 4 * mask_l.sum() == overlap_cells > 0

    check_peaks(t_dec, mask_s, layout["s_tokens"], layout["l_fine"])
    check_peaks(t_comp, mask_l, layout["l_tokens"], layout["s_coarse"])
    np.testing.assert_allclose(
        t_dec, expected_target(layout["s_tokens"], layout["l_fine"], mask_s, cell, DECOMP_RADIUS),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        t_comp, expected_target(layout["l_tokens"], layout["s_coarse"], mask_l, 2 * cell, COMP_RADIUS),
        atol=1e-6,
    )
    check_mask_consistency(n, mask_l, mask_s, t_dec, t_comp)


def check_peaks(
    target: np.ndarray, row_mask: np.ndarray, row_rects: np.ndarray, col_rects: np.ndarray
) -> None:
    """One peak (value 1) per kept row, linking two identical pixel rectangles; other rows zero."""
    peaks = target == 1.0
    np.testing.assert_array_equal(peaks.sum(1), row_mask.astype(int))
    assert not target[~row_mask].any()
    rows, cols = np.nonzero(peaks)
    np.testing.assert_array_equal(row_rects[rows], col_rects[cols])


def check_mask_consistency(
    n: int, mask_l: np.ndarray, mask_s: np.ndarray, t_dec: np.ndarray, t_comp: np.ndarray
) -> None:
    """Spec 2.4: upsampled M_L = fine positions matched by M_S; pooled M_S = coarse matched by M_L."""
    upsampled_l = np.kron(mask_l.reshape(n, n), np.ones((2, 2), dtype=bool)).ravel()
    np.testing.assert_array_equal(upsampled_l, (t_dec == 1.0).any(0))
    pooled_s = mask_s.reshape(n // 2, 2, n // 2, 2).any(axis=(1, 3)).ravel()
    np.testing.assert_array_equal(pooled_s, (t_comp == 1.0).any(0))


def _overlap_area(a: np.ndarray, b: np.ndarray) -> int:
    rows = min(a[1], b[1]) - max(a[0], b[0]) + 1
    cols = min(a[3], b[3]) - max(a[2], b[2]) + 1
    return int(max(rows, 0) * max(cols, 0))


def all_pairs(geo: GeometryConfig) -> list[ViewPair]:
    axis = [
        (xl, xs) for xl in range(geo.grid - 2 * geo.n + 1)
        for xs in range(xl % 2, geo.grid - geo.n + 1, 2)
    ]
    return [ViewPair(xl, yl, xs, ys) for (xl, xs), (yl, ys) in itertools.product(axis, axis)]


def test_tiny_geometry_every_possible_pair_matches_pixels() -> None:
    geo = GEOMETRIES["tiny"]
    base = coordinate_base(geo)
    pairs = all_pairs(geo)
    assert len(pairs) == 11 * 11
    for pair in pairs:
        check_pair(geo, pair, base)


@pytest.mark.parametrize("name", ["cpu", "full"])
def test_random_pairs_match_pixels(name: str) -> None:
    geo = GEOMETRIES[name]
    base = coordinate_base(geo)
    rng = np.random.default_rng(7)
    top, far = geo.grid - 2 * geo.n, geo.grid - geo.n
    extremes = [ViewPair(0, top, far, top % 2), ViewPair(top, 0, top % 2, far - far % 2)]
    draws = 12 if name == "cpu" else 6  # full: 1024 px base images, fewer draws
    for pair in extremes + [sample_pair(rng, geo.grid, geo.n) for _ in range(draws)]:
        check_pair(geo, pair, base)


def test_checker_catches_the_reference_transposition() -> None:
    """The reference code's transposed targets (docs/model.md, bug Q1) must fail the pixel check."""
    geo = GEOMETRIES["tiny"]
    n = geo.n
    pair = ViewPair(0, 2, 4, 0)  # dr = 4, dc = -2
    layout = physical_layout(geo, pair, coordinate_base(geo))
    _, mask_s = overlap_masks(pair, n)
    t_dec = decomposition_target(pair, n).reshape(n, n, 2 * n, 2 * n)
    transposed = t_dec.transpose(1, 0, 3, 2).reshape(n * n, 4 * n * n)
    mask_t = mask_s.reshape(n, n).T.ravel()
    with pytest.raises(AssertionError):
        check_peaks(transposed, mask_t, layout["s_tokens"], layout["l_fine"])


@pytest.mark.parametrize("name", ["tiny", "cpu", "full"])
def test_sample_pair_parity_and_range(name: str) -> None:
    geo = GEOMETRIES[name]
    rng = np.random.default_rng(0)
    pairs = np.array([sample_pair(rng, geo.grid, geo.n).as_array() for _ in range(2000)])
    xl, yl, xs, ys = pairs.T
    assert ((xs - xl) % 2 == 0).all() and ((ys - yl) % 2 == 0).all()
    assert set(np.concatenate([xl, yl])) == set(range(geo.grid - 2 * geo.n + 1))
    assert set(np.concatenate([xs, ys])) == set(range(geo.grid - geo.n + 1))


def test_view_pair_offsets() -> None:
    pair = ViewPair(xl=1, yl=2, xs=5, ys=0)
    assert (pair.dr, pair.dc) == (4, -2)
    np.testing.assert_array_equal(pair.as_array(), [1, 2, 5, 0])


def test_large_view_is_exact_2x2_mean() -> None:
    geo = GEOMETRIES["tiny"]
    base = np.random.default_rng(1).random((geo.base_px, geo.base_px, 3)).astype(np.float32)
    pair = ViewPair(1, 2, 3, 0)
    large, small = cut_views(base, pair, geo.cell, geo.n)
    c = geo.cell
    np.testing.assert_allclose(large[0, 0], base[c : c + 2, 2 * c : 2 * c + 2].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_array_equal(small, base[3 * c : 7 * c, 0 : 4 * c])


@pytest.mark.parametrize(
    ("grid", "n", "message"),
    [(10, 3, "even"), (7, 4, "2n <= grid < 3n"), (12, 4, "2n <= grid < 3n"), (10, 0, "n")],
)
def test_check_geometry_rejects_bad_grids(grid: int, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_geometry(grid, n)
    with pytest.raises(ValueError, match=message):
        GeometryConfig(n=n, grid=grid)


@pytest.mark.parametrize("field", ["cell", "n"])
def test_geometry_config_rejects_non_positive_sizes(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GeometryConfig(**{field: 0})  # type: ignore[arg-type]


def test_view_size_must_match_backbone_input() -> None:
    with pytest.raises(ValueError, match="img_size"):
        ACEConfig(geometry=GeometryConfig(n=4, cell=16, grid=10), model=ModelConfig(img_size=224))
