"""How long a run is and what every step sets: the run plan and the per-step schedule arrays
(learning rate, weight decay, teacher momentum), as in dinov2: arrays, trivial to test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ace_model.config import TrainConfig
from ace_model.errors import InputError

LR_REFERENCE_BATCH = 256  # lr is given per 256 images (linear scaling rule)


@dataclass(frozen=True)
class RunPlan:
    total_steps: int  # optimizer steps of the whole run (the schedules' length)
    steps_per_epoch: int  # steps between sampler epochs
    global_batch: int  # samples per step over all ranks
    world_size: int  # processes


@dataclass(frozen=True)
class Schedules:
    lr: np.ndarray  # (total_steps,) learning rate of both groups
    weight_decay: np.ndarray  # (total_steps,) weight decay of the decayed group
    momentum: np.ndarray  # (total_steps,) teacher EMA momentum


def cosine_schedule(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_from: float = 0.0
) -> np.ndarray:
    """(total_steps,) values: linear ramp warmup_from -> start, then half a cosine start -> end."""
    if total_steps < 1:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    ramp = warmup_from + (start - warmup_from) * np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    rest = total_steps - warmup_steps
    phase = np.arange(rest) / max(rest - 1, 1)  # 0 .. 1 inclusive: the last step reaches `end`
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * phase))
    return np.concatenate([ramp, decay]).astype(np.float64)


def plan_run(train: TrainConfig, num_images: int, world_size: int, max_steps: int | None) -> RunPlan:
    """Epoch length from the data size (or train.steps_per_epoch); length = max_steps or epochs."""
    global_batch = train.batch_size * world_size
    steps_per_epoch = train.steps_per_epoch or num_images // global_batch
    if steps_per_epoch < 1:
        raise InputError(
            f"{num_images} training images are fewer than one global batch ({global_batch}); "
            "add images, lower --train.batch_size or set --train.steps_per_epoch"
        )
    total = max_steps if max_steps is not None else train.epochs * steps_per_epoch
    if total < 1:
        raise InputError(f"the run must have at least one step, got {total}")
    return RunPlan(total, steps_per_epoch, global_batch, world_size)


def build_schedules(train: TrainConfig, plan: RunPlan) -> Schedules:
    peak_lr = train.lr * plan.global_batch / LR_REFERENCE_BATCH
    warmup = round(train.warmup_epochs * plan.steps_per_epoch)
    return Schedules(
        lr=cosine_schedule(peak_lr, train.min_lr, plan.total_steps, warmup),
        weight_decay=cosine_schedule(train.weight_decay, train.weight_decay_end, plan.total_steps),
        momentum=cosine_schedule(train.ema_momentum, 1.0, plan.total_steps),
    )
