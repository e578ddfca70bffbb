"""ace_model.match on synthetic grids and similarity maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ace_model.match import argmax_2d, locate, refine_peak, sample_grid


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


def test_locate_finds_the_shifted_copy() -> None:
    query = random_grid(8, 8)
    target = torch.roll(query, shifts=(2, -1), dims=(0, 1))  # query (r, c) -> target (r+2, c-1)
    points = np.array([[3.0, 1.0], [5.0, 4.0], [2.0, 0.0]])  # (x, y) grid coords
    found = locate(query, points, target, refine="none")
    expected = np.stack([(points[:, 0] - 1) % 8, (points[:, 1] + 2) % 8], axis=1)
    np.testing.assert_allclose(found.xy, expected)
    np.testing.assert_allclose(found.score, 1.0, atol=1e-5)
    assert found.mutual.all()


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


def test_mutual_flag_false_when_target_patch_prefers_another_query_patch() -> None:
    query = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # (1, 2, 2): patches A, B
    target = torch.tensor([[[0.8, 0.6], [-1.0, 0.0]]])  # T prefers B (0.96) over A (0.8)
    found = locate(query, np.array([[0.0, 0.0], [1.0, 0.0]]), target, refine="none")
    np.testing.assert_array_equal(found.patch, [[0, 0], [0, 0]])
    np.testing.assert_array_equal(found.mutual, [False, True])


def test_padding_is_never_matched() -> None:
    query = random_grid(6, 6)
    target = random_grid(6, 6, seed=1).clone()
    target[0, 5] = query[3, 3]  # the perfect match sits on letterbox padding
    target[3, 4] = F.normalize(query[3, 3] + 0.4 * target[3, 4], dim=0)  # a good valid match
    valid = torch.ones(6, 6, dtype=torch.bool)
    valid[:, 5] = False
    found = locate(query, np.array([[3.0, 3.0]]), target, valid)
    np.testing.assert_array_equal(found.patch, [[3, 4]])
    assert found.xy[0, 0] <= 4.5
    unmasked = locate(query, np.array([[3.0, 3.0]]), target)
    np.testing.assert_array_equal(unmasked.patch, [[0, 5]])


def test_refinement_ignores_masked_neighbours() -> None:
    sim = bump(5, 5, 2.0, 2.0, "paraboloid").clone()
    sim[0, 2, 3] = -2.0  # masked right neighbour would otherwise pull the peak left
    refined = refine_peak(sim, *argmax_2d(sim), "quadratic")[0].numpy()
    np.testing.assert_allclose(refined, [2.0, 2.0], atol=1e-6)
