"""Training: schedules as arrays, optimizer groups, clipping, resume, export, config resolution, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ace_model.config import ACEConfig, preset
from ace_model.encoder import load_encoder
from ace_model.method import ACE
from tests.helpers import write_images
from training import checkpoints, cmd_train, engine, export, run_config, run_state, schedules
from training.cli import main

TINY = preset("tiny")


# ---------------------------------------------------------------------------------------------
# Schedules


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_end_value() -> None:
    values = schedules.cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5)
    assert values.shape == (20,)
    np.testing.assert_allclose(values[:5], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert values.max() == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert np.all(np.diff(values[5:]) <= 0)


def test_cosine_schedule_without_warmup_can_increase() -> None:
    values = schedules.cosine_schedule(0.04, 0.4, total_steps=11)
    assert values[0] == pytest.approx(0.04) and values[-1] == pytest.approx(0.4)
    assert values[5] == pytest.approx(0.22)  # half-way point of the cosine
    assert np.all(np.diff(values) >= 0)


def test_cosine_schedule_clips_a_warmup_longer_than_the_run() -> None:
    np.testing.assert_allclose(schedules.cosine_schedule(1.0, 0.0, 3, warmup_steps=10), [1 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError, match="at least one step"):
        schedules.cosine_schedule(1.0, 0.0, 0)


def test_schedules_scale_lr_with_the_global_batch() -> None:
    settings = {"train.lr": 5e-4, "train.batch_size": 8, "train.warmup_epochs": 2.0, "train.epochs": 4}
    train = TINY.override(settings).train
    plan = schedules.plan_run(train, num_images=400, world_size=4, max_steps=None)
    assert (plan.steps_per_epoch, plan.global_batch, plan.total_steps) == (12, 32, train.epochs * 12)
    arrays = schedules.build_schedules(train, plan)
    peak = 5e-4 * 32 / 256
    assert arrays.lr[23] == pytest.approx(peak) and arrays.lr[:23].max() < peak
    assert arrays.lr[-1] == pytest.approx(train.min_lr)
    np.testing.assert_allclose(arrays.weight_decay[[0, -1]], [0.04, 0.4])
    np.testing.assert_allclose(arrays.momentum[[0, -1]], [0.996, 1.0])


def test_plan_uses_max_steps_and_rejects_tiny_data() -> None:
    assert schedules.plan_run(TINY.train, 8, 1, max_steps=50).total_steps == 50
    with pytest.raises(ValueError, match="fewer than one global batch"):
        schedules.plan_run(TINY.train, 3, 2, max_steps=None)


# ---------------------------------------------------------------------------------------------
# Optimizer pieces


def test_param_groups_exempt_biases_and_1d_params_from_decay() -> None:
    model = ACE(TINY)
    groups = run_state.param_groups(model.trainable_named_parameters())
    decayed = {id(p) for p in groups[0]["params"]}
    named = dict(model.trainable_named_parameters())
    assert groups[1]["weight_decay"] == 0.0
    for name, param in named.items():
        assert (id(param) in decayed) == (param.ndim > 1 and not name.endswith(".bias")), name
    assert not any(name.startswith("teacher.") for name in named)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_gradients_are_clipped_per_parameter() -> None:
    big, small = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
    engine.clip_per_parameter([big, small], max_norm=0.8)
    assert big.grad.norm().item() == pytest.approx(0.8, rel=1e-5)
    torch.testing.assert_close(big.grad, torch.tensor([0.48, 0.64, 0.0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(small.grad, torch.tensor([0.1, 0.0]))


def test_last_layer_gradients_dropped_only_in_the_frozen_epochs() -> None:
    model = ACE(TINY)
    last = list(model.student.dino_head.last_layer.parameters())
    for epoch, expect_grad in [(0, False), (1, True)]:
        for param in last:
            param.grad = torch.ones_like(param)
        engine.cancel_last_layer_grads(model, epoch, freeze_epochs=1)
        assert all((p.grad is not None) == expect_grad for p in last)


# ---------------------------------------------------------------------------------------------
# Training runs (tiny preset, a few steps)





def losses(run_dir: Path) -> list[tuple[int, float, float, float, float]]:
    records = [json.loads(line) for line in (run_dir / engine.METRICS_FILE).read_text().splitlines()]
    return [(r["step"], r["loss"], r["global"], r["dec"], r["comp"]) for r in records]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A straight 4-step run and a 2 + 2 run resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    images = write_images(root / "images")
    options = {"device": "cpu", "show_progress": False, "threads": 1}
    straight = engine.train(TINY, images, root / "straight", max_steps=4, **options)
    engine.train(TINY, images, root / "split", max_steps=4, stop_after=2, **options)
    resumed = engine.train(TINY, images, root / "split", resume=True, **options)
    return {"root": root, "straight": straight, "resumed": resumed}


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_loss_trajectory(runs: dict[str, Path]) -> None:
    straight, split = losses(runs["root"] / "straight"), losses(runs["root"] / "split")
    assert [r[0] for r in split] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(split), np.array(straight), rtol=1e-5, atol=1e-6)
    a = checkpoints.load_checkpoint(runs["straight"])["model"]
    b = checkpoints.load_checkpoint(runs["resumed"])["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_run_directory_holds_config_checkpoints_and_finite_losses(runs: dict[str, Path]) -> None:
    run_dir = runs["root"] / "straight"
    assert ACEConfig.from_dict(json.loads((run_dir / run_config.CONFIG_FILE).read_text())) == TINY
    assert json.loads((run_dir / engine.RUN_FILE).read_text())["plan"]["total_steps"] == 4
    checkpoint = checkpoints.load_checkpoint(run_dir)
    assert checkpoint["step"] == 4 and set(checkpoint) >= {"model", "optimizer", "scaler", "rng"}
    assert all(np.isfinite(value) for record in losses(run_dir) for value in record)


@pytest.mark.slow
def test_resume_with_another_config_is_refused(runs: dict[str, Path]) -> None:
    other = TINY.override({"train.lr": 1e-3})
    with pytest.raises(ValueError, match=r"train\.lr"):
        engine.train(other, sorted((runs["root"] / "images").glob("*.png")), runs["root"] / "split",
                     resume=True, device="cpu", show_progress=False)


@pytest.mark.slow
def test_export_gives_an_encoder_equal_to_the_teacher_backbone(runs: dict[str, Path]) -> None:
    artifact = runs["root"] / "artifact"
    export.export_encoder(runs["straight"], artifact)
    encoder = load_encoder(artifact)
    model = ACE(TINY)
    model.load_state_dict(checkpoints.load_checkpoint(runs["straight"])["model"])
    images = torch.randn(2, 3, TINY.model.img_size, TINY.model.img_size)
    with torch.no_grad():
        expected = F.normalize(model.teacher.backbone.eval()(images), dim=-1)
        got = encoder(images).patches
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert encoder.spec.provenance["step"] == 4
    assert encoder.spec.provenance["config"]["name"] == "tiny"


def test_init_encoder_is_seeded(tmp_path: Path) -> None:
    first = export.init_encoder(TINY, tmp_path / "a", seed=1)
    again = export.init_encoder(TINY, tmp_path / "b", seed=1)
    other = export.init_encoder(TINY, tmp_path / "c", seed=2)
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert load_encoder(tmp_path / "a").spec.provenance["source"] == "random init"


# ---------------------------------------------------------------------------------------------
# Command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ace")
    cmd_train.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_overrides_are_typed_from_the_config_fields(tmp_path: Path) -> None:
    args = parse(["train", "--preset", "tiny", "--data", "x", "--out", str(tmp_path),
                  "--train.lr=1e-4", "--geometry.base_scale=0.9,1.0", "--loss.use_global", "false",
                  "--train.batch_size=4"])
    config = cmd_train.resolve_args_config(args)
    assert config.train.lr == 1e-4 and config.train.batch_size == 4
    assert config.geometry.base_scale == (0.9, 1.0) and config.loss.use_global is False
    assert config.model == TINY.model


def test_config_file_names_its_preset_and_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "tiny", "train": {"lr": 2e-4, "seed": 3}}))
    args = parse(["train", "--config", str(path), "--train.seed=4", "--out", str(tmp_path)])
    config = cmd_train.resolve_args_config(args)
    assert (config.name, config.train.lr, config.train.seed) == ("tiny", 2e-4, 4)


def test_bad_values_and_keys_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path), "--data", str(tmp_path), "--loss.use_global=maybe"]) == 2
    err = capsys.readouterr().err
    assert err == "ace train: --loss.use_global=maybe: expected true or false, got 'maybe'\n"
    with pytest.raises(SystemExit):
        parse(["train", "--out", str(tmp_path), "--train.no_such_key=1"])


def test_resume_without_config_arguments_uses_the_run_config(tmp_path: Path) -> None:
    (tmp_path / run_config.CONFIG_FILE).write_text(json.dumps(TINY.override({"train.seed": 9}).to_dict()))
    config = cmd_train.resolve_args_config(parse(["train", "--out", str(tmp_path), "--resume"]))
    assert config.name == "tiny" and config.train.seed == 9
