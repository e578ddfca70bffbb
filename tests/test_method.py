"""The ACE method: EMA scope and pairing, trainable parameters, losses at init, learning (invariants 5-6)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from ace_model.config import ACEConfig, GeometryConfig, LossConfig, tiny
from ace_model.method import ACE, ACEBatch

BatchFactory = Callable[[ACEConfig, int, int], ACEBatch]  # the `make_batch` fixture of conftest.py

EMA_MODULES = {"backbone", "dino_head", "dense_head"}


def tiny_with_loss(**changes: object) -> ACEConfig:
    config = tiny()
    return dataclasses.replace(config, loss=dataclasses.replace(config.loss, **changes))  # type: ignore[arg-type]


@pytest.fixture
def model() -> ACE:
    torch.manual_seed(0)
    return ACE(tiny())


def test_teacher_holds_only_backbone_dino_and_dense_heads(model: ACE) -> None:
    teacher_names = {name for name, _ in model.teacher.named_parameters()}
    assert {name.split(".")[0] for name in teacher_names} == EMA_MODULES
    assert teacher_names == {name for name, _ in model.student.named_parameters()}
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_student_and_teacher_start_identical(model: ACE) -> None:
    teacher = model.teacher.state_dict()
    for name, value in model.student.state_dict().items():
        torch.testing.assert_close(teacher[name], value)


def test_update_teacher_pairs_parameters_by_name(model: ACE) -> None:
    """Reorder the teacher's modules so zip-order pairing (docs/model.md, bug Q11) would mix tensors up."""
    with torch.no_grad():
        for param in model.student.parameters():
            param.add_(torch.randn_like(param))
    modules = model.teacher._modules
    model.teacher._modules = {name: modules[name] for name in reversed(list(modules))}
    assert next(iter(model.teacher.named_parameters()))[0] != next(iter(model.student.named_parameters()))[0]
    before = {name: p.clone() for name, p in model.teacher.named_parameters()}
    up_before = [p.clone() for p in model.decompose.parameters()]
    model.update_teacher(0.9)
    student = dict(model.student.named_parameters())
    for name, param in model.teacher.named_parameters():
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * student[name])
    for param, old in zip(model.decompose.parameters(), up_before, strict=True):
        torch.testing.assert_close(param, old)


def test_trainable_parameters_are_the_student_and_the_up_down_mlps(model: ACE) -> None:
    names = [name for name, _ in model.trainable_named_parameters()]
    assert {name.split(".")[0] for name in names} == {"student", "decompose", "compose"}
    assert all(".parametrizations.weight.original0" not in name for name in names)  # DINO gain fixed
    assert "log_scale" not in dict(model.named_parameters())
    assert model.log_scale.exp().item() == pytest.approx(1 / 0.07)


def test_learnable_logit_scale_is_trained_and_gets_a_gradient(make_batch: BatchFactory) -> None:
    model = ACE(tiny_with_loss(learn_logit_scale=True))
    assert "log_scale" in dict(model.trainable_named_parameters())
    model(make_batch(model.config, 2, 0))["loss"].backward()
    assert model.log_scale.grad is not None and model.log_scale.grad.abs() > 0


def test_losses_at_init_are_finite_and_non_negative(model: ACE, make_batch: BatchFactory) -> None:
    out = model(make_batch(model.config, 2, 0))
    assert set(out) == {"loss", "global", "dec", "comp"}
    for name, value in out.items():
        assert torch.isfinite(value) and value >= 0, name
    expected = 0.1 * out["global"] + (out["dec"] + out["comp"]) / 2
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_backward_reaches_the_student_only(model: ACE, make_batch: BatchFactory) -> None:
    model(make_batch(model.config, 2, 1))["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.decompose.net[0].weight.grad is not None and model.compose.net[0].weight.grad is not None
    assert model.student.backbone.model.patch_embed.proj.weight.grad is not None  # type: ignore[union-attr]


def test_few_steps_on_a_fixed_batch_lower_both_matching_losses(model: ACE, make_batch: BatchFactory) -> None:
    batch = make_batch(model.config, 2, 0)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-4)
    history = []
    for _ in range(6):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append((out["dec"].item(), out["comp"].item()))
    (dec_first, comp_first), (dec_last, comp_last) = history[0], history[-1]
    assert dec_last < 0.9 * dec_first and comp_last < 0.9 * comp_first, history
    for name, value in model.teacher.named_parameters():
        torch.testing.assert_close(value, teacher_before[name])  # the teacher stayed frozen


@pytest.mark.parametrize(("use_global", "use_matching"), [(True, False), (False, True)])
def test_ablation_switches_drop_their_parts(
    make_batch: BatchFactory, use_global: bool, use_matching: bool
) -> None:
    model = ACE(tiny_with_loss(use_global=use_global, use_matching=use_matching))
    out = model(make_batch(model.config, 2, 0))
    assert ("global" in out) == use_global and ("dec" in out) == ("comp" in out) == use_matching
    assert torch.isfinite(out["loss"])


def test_both_branches_off_is_refused() -> None:
    with pytest.raises(ValueError, match="both loss branches"):
        ACE(tiny_with_loss(use_global=False, use_matching=False))


def test_backbone_grid_must_match_the_geometry() -> None:
    config = dataclasses.replace(tiny(), geometry=GeometryConfig(n=8, cell=8, grid=16))
    with pytest.raises(ValueError, match="4x4 token grid, but the geometry needs 8x8"):
        ACE(config)


def test_optional_variants_run(make_batch: BatchFactory) -> None:
    model = ACE(tiny_with_loss(normalize_student_local=True, mask_nonoverlap_rows=True))
    out = model(make_batch(model.config, 2, 3))
    assert all(torch.isfinite(v) for v in out.values())
    assert LossConfig().mask_nonoverlap_rows is False
