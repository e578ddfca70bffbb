"""Losses against their formulas (docs/model.md, "Losses") and the masked mean (its invariants)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from ace_model.config import tiny
from ace_model.geometry import cut_views, overlap_masks, sample_pair
from ace_model.losses import OverlapDINOLoss, alpha_balanced_bce, masked_mean


def token_centres(view: np.ndarray, cell: int, halo: float) -> torch.Tensor:
    """(k*k, 2) base-pixel centre of each cell x cell token, read from a (row, col) coordinate view."""
    k = view.shape[0] // cell
    tiles = view.reshape(k, cell, k, cell, 2)
    centre = (tiles.min(axis=(1, 3)) - halo + tiles.max(axis=(1, 3)) + halo) / 2
    return torch.from_numpy(centre.reshape(k * k, 2).astype(np.float64))


@pytest.mark.parametrize("seed", range(5))
def test_masked_mean_is_the_mean_over_physically_overlapping_tokens(seed: int) -> None:
    """Tokens carry their own pixel centre; the masked mean must be the overlap rectangle's centre."""
    geo = tiny().geometry
    rows, cols = np.mgrid[0 : geo.base_px, 0 : geo.base_px].astype(np.float32)
    base = np.stack([rows, cols], axis=-1)
    pair = sample_pair(np.random.default_rng(seed), geo.grid, geo.n)
    large, small = cut_views(base, pair, geo.cell, geo.n)
    mask_l, mask_s = (torch.from_numpy(m) for m in overlap_masks(pair, geo.n))
    top = max(pair.xl, pair.xs) * geo.cell
    bottom = min(pair.xl + 2 * geo.n, pair.xs + geo.n) * geo.cell - 1
    left = max(pair.yl, pair.ys) * geo.cell
    right = min(pair.yl + 2 * geo.n, pair.ys + geo.n) * geo.cell - 1
    overlap_centre = torch.tensor([(top + bottom) / 2, (left + right) / 2], dtype=torch.float64)
    views = ((token_centres(large, geo.cell, 0.5), mask_l), (token_centres(small, geo.cell, 0.0), mask_s))
    for centres, mask in views:
        pooled = masked_mean(centres[None], mask[None])[0]
        torch.testing.assert_close(pooled, overlap_centre)


def test_masked_mean_handles_empty_masks_and_blocks_gradients_outside() -> None:
    tokens = torch.randn(2, 6, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True, False, False, False], [False] * 6])
    pooled = masked_mean(tokens, mask)
    torch.testing.assert_close(pooled[0], tokens[0, [0, 2]].mean(0))
    torch.testing.assert_close(pooled[1], torch.zeros(3))
    pooled.sum().backward()
    assert tokens.grad is not None
    assert (tokens.grad[0, [1, 3, 4, 5]] == 0).all() and (tokens.grad[0, [0, 2]] == 0.5).all()


@pytest.mark.parametrize("alpha", [0.99, 0.9, 0.5])
def test_alpha_balanced_bce_matches_torchvision_focal_loss_with_gamma_0(alpha: float) -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, 7) * 4, torch.rand(2, 5, 7)
    expected = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=0.0, reduction="mean")
    torch.testing.assert_close(alpha_balanced_bce(logits, target, alpha), expected)


def test_alpha_balanced_bce_row_mask_averages_over_kept_rows_only() -> None:
    torch.manual_seed(1)
    logits, target = torch.randn(2, 4, 3), torch.rand(2, 4, 3)
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    masked = alpha_balanced_bce(logits, target, 0.9, keep)
    kept = alpha_balanced_bce(logits[keep][None], target[keep][None], 0.9)
    torch.testing.assert_close(masked, kept)


def test_alpha_balanced_bce_is_float32_under_half_inputs() -> None:
    logits, target = torch.randn(1, 2, 3).half(), torch.rand(1, 2, 3).half()
    assert alpha_balanced_bce(logits, target, 0.9).dtype == torch.float32


def reference_dino(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Spec 4.1 written out per sample: teacher S supervises student L and vice versa."""
    b = student.shape[0] // 2
    total = torch.zeros(())
    for i in range(b):
        for s_row, t_row in ((i, b + i), (b + i, i)):
            p = torch.softmax((teacher[t_row] - center[0]) / 0.04, dim=-1)
            total = total - (p * torch.log_softmax(student[s_row] / 0.1, dim=-1)).sum()
    return total / (2 * b)


def test_overlap_dino_loss_pairs_views_across_and_updates_the_center() -> None:
    torch.manual_seed(2)
    loss_fn = OverlapDINOLoss(out_dim=10, student_temp=0.1, teacher_temp=0.04, momentum=0.9)
    loss_fn.center.fill_(0.3)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    loss = loss_fn(student, teacher)
    torch.testing.assert_close(loss, reference_dino(student, teacher, torch.full((1, 10), 0.3)))
    torch.testing.assert_close(loss_fn.center, 0.9 * 0.3 + 0.1 * teacher.mean(0, keepdim=True))


def test_overlap_dino_loss_is_lowest_when_student_matches_the_other_view() -> None:
    def fresh_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return OverlapDINOLoss(out_dim=4, student_temp=0.1, teacher_temp=0.04, momentum=0.9)(student, teacher)

    teacher = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])  # [L; S]
    crossed = fresh_loss(teacher[[1, 0]], teacher)  # student L predicts teacher S and vice versa
    same_view = fresh_loss(teacher, teacher)
    assert crossed < same_view


def test_soft_target_cross_entropy_is_zero_only_for_a_peaked_match_and_skips_empty_rows() -> None:
    from ace_model.losses import soft_target_cross_entropy

    target = torch.zeros(1, 3, 4)
    target[0, 0, 1], target[0, 1, 2] = 1.0, 1.0  # row 2 has no target (outside the overlap)
    good = torch.full((1, 3, 4), -50.0)
    good[0, 0, 1], good[0, 1, 2] = 50.0, 50.0
    assert float(soft_target_cross_entropy(good, target)) < 1e-6
    uniform = torch.zeros(1, 3, 4)
    torch.testing.assert_close(soft_target_cross_entropy(uniform, target), torch.tensor(math.log(4)))


def test_ace_local_terms_have_a_softmax_form_and_unknown_forms_are_refused() -> None:
    from ace_model.method import ACE

    config = tiny().override({"loss.local_form": "softmax"})
    model = ACE(config)
    assert model.config.loss.local_form == "softmax"
    with pytest.raises(ValueError, match="local_form"):
        ACE(tiny().override({"loss.local_form": "bce"}))


def test_content_blind_floors_match_the_note_and_the_softmax_form() -> None:
    from ace_model.losses import constant_logit_floor, content_blind_floors

    target = torch.zeros(2, 10, 40)
    target[:, torch.arange(10), torch.arange(10) * 4] = 1.0
    floor = constant_logit_floor(target, 0.99)
    for c in (-6.0, -3.0, 0.0, 3.0):  # no constant logit does better
        assert floor <= float(alpha_balanced_bce(torch.full_like(target, c), target, 0.99)) + 1e-6
    floors = content_blind_floors(target, target[..., :8], 4096, "softmax", 0.99, 0.9)
    assert floors == pytest.approx({"global": math.log(4096), "dec": math.log(40), "comp": math.log(8)})
