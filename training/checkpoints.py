"""Checkpoints of a training run: RUN_DIR/checkpoints/step_NNNNNNN.pt holds the model (teacher
included), optimizer, scaler, step, plan, config and every rank's RNG states, so `--resume`
continues exactly; the newest KEEP_CHECKPOINTS are kept."""

from __future__ import annotations

import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ace_model.config import ACEConfig
from ace_model.errors import InputError
from training.distributed import gather
from training.run_config import compare
from training.run_state import Run
from training.schedules import RunPlan

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2  # older periodic checkpoints are deleted


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoints in {path / CHECKPOINT_DIR}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def save_checkpoint(run: Run) -> Path:
    """Written by rank 0 (temp file + rename); every rank must call it (RNG states are gathered)."""
    rng = gather(run.info, rng_state())
    path = checkpoint_path(run.out_dir, run.step)
    run.saved_step = run.step
    if not run.info.is_main:
        return path
    state = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "step": run.step, "epoch": run.epoch,
        "sampler_epoch": run.epoch, "plan": asdict(run.plan), "config": run.config.to_dict(),
        "rng": rng,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    prune_checkpoints(path.parent)
    return path


def prune_checkpoints(folder: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()


def check_resumable(checkpoint: dict[str, Any], config: ACEConfig, plan: RunPlan) -> None:
    """Exact continuation needs the same config and plan; say what differs otherwise."""
    differ = compare(checkpoint["config"], config)
    if differ:
        raise InputError(f"cannot resume: the config differs from the checkpoint's in {differ}; "
                         "resume with the run's own config (omit --preset/--config/overrides)")
    saved_plan = RunPlan(**checkpoint["plan"])
    if saved_plan != plan:
        raise InputError(f"cannot resume: the checkpoint was planned as {saved_plan}, this run as {plan} "
                         "(same --max-steps, data size and number of processes are required)")


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    """Weights, optimizer, scaler, step and (same world size) this rank's RNG states."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.step = run.saved_step = int(checkpoint["step"])
    states = checkpoint["rng"]
    if len(states) == run.info.world_size:
        set_rng_state(states[run.info.rank])


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
