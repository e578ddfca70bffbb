"""ace_model.match on synthetic grids and similarity maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ace_model.match import MASKED, argmax_2d, refine_peak, sample_grid


def random_grid(h: int, w: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(h, w, dim, generator=generator), dim=-1)


def bump(h: int, w: int, x0: float, y0: float, kind: str) -> torch.Tensor:
    """(1, h, w) smooth similarity map peaking at the fractional grid point (x0, y0)."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    dist2 = (xs - x0) ** 2 + (ys - y0) ** 2
    if kind == "paraboloid":
        return (1.0 - 0.05 * dist2)[None]
    return torch.exp(-dist2 / (2 * 1.5**2))[None]


def test_sample_grid_at_patch_centres_returns_those_patches() -> None:
    grid = random_grid(5, 6)
    sampled = sample_grid(grid, torch.tensor([[0.0, 0.0], [5.0, 4.0], [2.0, 3.0]]))
    torch.testing.assert_close(sampled, torch.stack([grid[0, 0], grid[4, 5], grid[3, 2]]))


@pytest.mark.parametrize(("x0", "y0"), [(4.3, 5.7), (6.0, 2.0), (3.5, 4.45), (7.8, 6.2)])
def test_quadratic_refinement_is_exact_on_a_paraboloid(x0: float, y0: float) -> None:
    sim = bump(10, 12, x0, y0, "paraboloid")
    rows, cols = argmax_2d(sim)
    refined = refine_peak(sim, rows, cols, "quadratic")
    np.testing.assert_allclose(refined[0].numpy(), [x0, y0], atol=1e-4)


@pytest.mark.parametrize(("x0", "y0"), [(4.3, 5.7), (6.2, 2.0), (3.6, 4.4)])
def test_refinement_recovers_a_fractional_gaussian_peak(x0: float, y0: float) -> None:
    sim = bump(10, 12, x0, y0, "gaussian")
    rows, cols = argmax_2d(sim)
    integer_error = np.hypot(cols.item() - x0, rows.item() - y0)
    refined = refine_peak(sim, rows, cols, "quadratic")
    error = np.hypot(*(refined[0].numpy() - [x0, y0]))
    assert error < 0.15
    assert error < integer_error


def test_refinement_keeps_integer_peak_at_the_border() -> None:
    sim = bump(6, 6, 0.0, 2.3, "paraboloid")
    rows, cols = argmax_2d(sim)
    refined = refine_peak(sim, rows, cols, "quadratic")[0].numpy()
    assert refined[0] == 0.0
    assert refined[1] == pytest.approx(2.3, abs=1e-4)


def test_unknown_refinement_is_rejected() -> None:
    sim = bump(4, 4, 1.0, 1.0, "paraboloid")
    with pytest.raises(ValueError, match="unknown refinement"):
        refine_peak(sim, *argmax_2d(sim), "cubic")  # type: ignore[arg-type]


def test_refinement_ignores_masked_neighbours() -> None:
    sim = bump(5, 5, 2.0, 2.0, "paraboloid").clone()
    sim[0, 2, 3] = -2.0  # masked right neighbour would otherwise pull the peak left
    refined = refine_peak(sim, *argmax_2d(sim), "quadratic")[0].numpy()
    np.testing.assert_allclose(refined, [2.0, 2.0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Two levels, coarse to fine

import ace_model.match as match_module  # noqa: E402
from ace_model.match import (  # noqa: E402
    Levels,
    MatchOptions,
    _fine_near,
    common_looks,
    look_scales,
    match_points,
    refine_near,
    similarity_maps,
)


def smooth_levels(side: int, shift_px: tuple[int, int] = (0, 0), seed: int = 0) -> Levels:
    """Levels of a smooth random image shifted by whole fine cells: grids of a side px input with
    the coarse level at stride 16 and the fine level at stride 4, consistent with each other."""
    gen = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(1, 16, side // 8, side // 8, generator=gen), size=(side, side),
                         mode="bicubic", align_corners=False)  # (1, D, side, side) smooth field
    base = torch.roll(base, shifts=(shift_px[1], shift_px[0]), dims=(2, 3))
    fine = F.normalize(F.avg_pool2d(base, 4)[0].permute(1, 2, 0), dim=-1)
    coarse = F.normalize(F.avg_pool2d(base, 16)[0].permute(1, 2, 0), dim=-1)
    return Levels(coarse, fine, side, (0.0, 0.0, float(side), float(side)))


def test_match_points_finds_a_shifted_image_at_fine_precision() -> None:
    query, target = smooth_levels(128), smooth_levels(128, shift_px=(8, -12))
    points = np.array([[40.0, 60.0], [66.0, 50.0], [58.0, 70.0]])  # fine cell centres
    found = match_points(query, points, target)
    # within the quadratic fit's bias on an asymmetric peak: well under half a fine cell (2 px)
    np.testing.assert_allclose(found.xy, points + np.array([8, -12]), atol=1.5)
    assert found.mutual.all() and ((found.confidence >= 0) & (found.confidence <= 1)).all()
    coarse_only = match_points(query, points, target, MatchOptions(mode="coarse"))
    assert np.abs(coarse_only.xy - (points + np.array([8, -12]))).max() > 1.0  # coarser alone


def test_match_points_never_answers_on_letterbox_padding() -> None:
    query = smooth_levels(128)
    target = Levels(query.coarse, query.fine, 128, (0.0, 0.0, 128.0, 64.0))  # lower half is padding
    found = match_points(query, np.array([[60.0, 100.0]]), target)
    assert found.xy[0, 1] <= 64.0


def test_a_second_look_at_twice_the_size_refines_within_its_window() -> None:
    query, target = smooth_levels(64), smooth_levels(64, shift_px=(4, 4))
    query_hi, target_hi = smooth_levels(128), smooth_levels(128, shift_px=(8, 8))
    points = np.array([[30.0, 30.0]])
    found = match_points(query, points, target, second_look=(query_hi, target_hi))
    np.testing.assert_allclose(found.xy, points + 4, atol=0.6)
    assert found.mutual.all()


def test_refine_near_stays_within_the_radius() -> None:
    query, target = smooth_levels(128), smooth_levels(128, shift_px=(20, 0))
    xy, _ = refine_near(query, np.array([[40.0, 40.0]]), target, np.array([[40.0, 40.0]]), radius_px=6.0)
    assert np.hypot(*(xy[0] - [40.0, 40.0])) <= 6.0 + 2.0  # peak refinement may move half a cell


def test_look_scales_follow_the_image_resolution() -> None:
    assert look_scales(512, 400, 224) == (2,)
    assert look_scales(2000, 1800, 224) == (2, 4)
    assert look_scales(2000, 1800, 224, max_scale=1) == ()
    assert look_scales(200, 200, 224) == ()
    small, large = smooth_levels(64), smooth_levels(128)
    assert common_looks([small, large], [large]) == [(large, large)]


def test_confidence_of_a_clear_coarse_peak_is_high_even_when_the_fit_moves_it() -> None:
    """The confidence window sits on the argmax cell, not on the refined point (which may move
    further than the radius on a stride-16 map)."""
    from ace_model.match import _first_pass

    coarse = torch.zeros(14, 14, 2)
    coarse[..., 1] = 1.0
    coarse[7, 7] = torch.tensor([1.0, 0.0])  # the query's twin
    coarse[7, 8] = F.normalize(torch.tensor([0.95, 0.3]), dim=0)  # pulls the sub-cell fit right
    levels = Levels(coarse, None, 224, (0.0, 0.0, 224.0, 224.0))
    query = torch.tensor([[120.0, 120.0]])
    peak, _, confidence = _first_pass(levels, query, levels, MatchOptions(mode="coarse"), None)
    assert peak[0, 0] > 120.0 + MatchOptions().confidence_radius  # refined beyond the radius
    assert float(confidence[0]) > 0.5


def test_looks_convert_through_each_sizes_own_letterbox() -> None:
    from ace_model.preprocess import CoordinateMap

    base_map = CoordinateMap.letterbox(1935, 2400, 224, 14)
    look_map = CoordinateMap.letterbox(1935, 2400, 896, 56)
    base = Levels.of(torch.zeros(14, 14, 2), None, base_map)
    look = Levels.of(torch.zeros(56, 56, 2), None, look_map)
    original = np.array([[10.0, 20.0], [967.5, 1200.0], [1900.0, 2390.0]])
    px = torch.as_tensor(base_map.to_model(original), dtype=torch.float32)
    in_look = look.from_level(base, px)
    np.testing.assert_allclose(look_map.to_original(in_look.double().numpy()), original, atol=1e-2)
    np.testing.assert_allclose(base.from_level(look, in_look).numpy(), px.numpy(), atol=1e-3)


def test_only_confident_answers_take_the_second_look() -> None:
    """A flat first-pass map (no idea where) keeps its answer; a look would only slide it."""
    flat = F.normalize(torch.ones(8, 8, 4), dim=-1)
    flat_fine = F.normalize(torch.ones(32, 32, 4), dim=-1)
    query = Levels(flat, flat_fine, 128, (0.0, 0.0, 128.0, 128.0))
    look_q, look_t = smooth_levels(256), smooth_levels(256, shift_px=(8, 8))
    points = np.array([[4.0, 4.0]])
    first = match_points(query, points, query)
    assert first.confidence[0] < 0.5
    kept = match_points(query, points, query, second_look=(look_q, look_t))
    np.testing.assert_allclose(kept.xy, first.xy)
    moved = match_points(query, points, query, MatchOptions(look_min_confidence=0.0),
                         second_look=(look_q, look_t))
    assert np.abs(moved.xy - first.xy).max() > 1.0


def test_an_image_thinner_than_a_cell_is_still_matched_on_its_content() -> None:
    query = smooth_levels(128)
    thin = Levels(query.coarse, query.fine, 128, (0.0, 60.0, 128.0, 61.5))  # 1.5 px of content
    found = match_points(query, np.array([[40.0, 60.0]]), thin, second_look=(query, thin))
    assert 56.0 <= found.xy[0, 1] <= 66.0 and found.score[0] > MASKED


def test_a_box_is_the_mean_of_the_cells_it_covers_or_the_cell_under_its_centre() -> None:
    from ace_model.match import box_vectors
    from ace_model.preprocess import CoordinateMap

    grid = random_grid(4, 4)
    coords = CoordinateMap.letterbox(64, 64, 64, 4)  # 16 px cells, centres at 8, 24, 40, 56
    boxes = np.array([[0.0, 0.0, 30.0, 30.0],  # centres (8, 8), (24, 8), (8, 24), (24, 24)
                      [40.0, 40.0, 44.0, 44.0]])  # no centre inside: the cell under (42, 42)
    vectors = box_vectors(grid, boxes, coords)
    expected = F.normalize(grid[:2, :2].reshape(-1, grid.shape[-1]).sum(0), dim=0)
    torch.testing.assert_close(vectors[0], expected)
    torch.testing.assert_close(vectors[1], grid[2, 2])


def test_a_second_look_answers_as_if_it_had_the_whole_fine_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """The look computes its fine map only around each previous answer (_fine_near); the answers,
    scores and confidences equal those from the whole map, including windows at the image border."""
    query, target = smooth_levels(64, seed=3), smooth_levels(64, shift_px=(4, -4), seed=3)
    looks = [(smooth_levels(128, seed=3), smooth_levels(128, shift_px=(8, -8), seed=3)),
             (smooth_levels(256, seed=3), smooth_levels(256, shift_px=(16, -16), seed=3))]
    points = np.array([[30.0, 30.0], [2.0, 60.0], [61.0, 3.0], [10.0, 12.5], [50.0, 44.0]])
    options = MatchOptions(look_min_confidence=0.0)  # every point takes both looks
    cropped = match_points(query, points, target, options, second_look=looks)
    monkeypatch.setattr(match_module, "_fine_near",
                        lambda queries, fine, centre, radius, stride: similarity_maps(queries, fine))
    whole = match_points(query, points, target, options, second_look=looks)
    np.testing.assert_allclose(cropped.xy, whole.xy, atol=1e-4)
    np.testing.assert_allclose(cropped.score, whole.score, atol=1e-5)
    np.testing.assert_array_equal(cropped.mutual, whole.mutual)
    np.testing.assert_allclose(cropped.confidence, whole.confidence, atol=1e-6)


def test_the_fine_map_near_a_centre_is_the_whole_maps_there_and_masked_elsewhere() -> None:
    levels = smooth_levels(128, seed=5)
    queries = levels.fine[[3, 30], [4, 1]]  # (2, d)
    centres = torch.tensor([[20.0, 14.0], [126.0, 1.0]])  # px; the second at the border
    near = _fine_near(queries, levels.fine, centres, 12.0, 4.0)
    whole = similarity_maps(queries, levels.fine)
    computed = near > MASKED
    torch.testing.assert_close(near[computed], whole[computed], atol=1e-6, rtol=0)
    cells = (torch.arange(32) + 0.5) * 4.0
    for n in range(2):  # every cell a 12 px window can reach, and its neighbours, were computed
        dist = ((cells[None, :] - centres[n, 0]) ** 2 + (cells[:, None] - centres[n, 1]) ** 2).sqrt()
        assert computed[n][dist <= 12.0 + 4.0 * 1.5].all() and not computed[n].all()
