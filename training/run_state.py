"""What one training run holds (`Run`: model, optimizer, scaler, schedules, plan, device) and how
it is created: the model on its device (DDP-wrapped across processes), AdamW with a decayed and
a never-decayed group, and mixed precision on GPU only."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ace_model.config import ACEConfig, TrainConfig
from ace_model.errors import InputError
from ace_model.method import ACE
from training.distributed import DistInfo
from training.run_config import AMP_DTYPE_NAMES
from training.schedules import RunPlan, Schedules, build_schedules

AMP_DTYPES = {name: getattr(torch, name) for name in AMP_DTYPE_NAMES}  # name -> torch.dtype


@dataclass
class Run:
    config: ACEConfig
    plan: RunPlan
    info: DistInfo
    model: ACE  # the unwrapped model (teacher update, checkpoints)
    forward: nn.Module  # what the loop calls: the model or its DDP wrapper
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    schedules: Schedules
    amp_dtype: torch.dtype | None
    out_dir: Path
    step: int = 0  # optimizer steps done
    saved_step: int = -1  # step of the newest checkpoint written by this invocation

    @property
    def epoch(self) -> int:
        return self.step // self.plan.steps_per_epoch


def create_run(config: ACEConfig, plan: RunPlan, info: DistInfo, out_dir: Path, amp_dtype: str) -> Run:
    model, forward = build_model(config, info)
    torch.manual_seed(config.train.seed + 1 + info.rank)  # per-rank stochastic depth
    dtype = resolve_amp(config.train, info.device, amp_dtype)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)
    return Run(config, plan, info, model, forward, build_optimizer(model), scaler,
               build_schedules(config.train, plan), dtype, out_dir)


def build_model(config: ACEConfig, info: DistInfo) -> tuple[ACE, nn.Module]:
    """The ACE model on its device and the module to call for the forward (DDP-wrapped if needed).

    DDP reduces only parameters that require grads, i.e. the student side; the teacher is an EMA
    of identical student weights, so it stays identical on every rank.
    """
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = ACE(config)
    if info.world_size > 1 and info.device.type == "cuda":
        # SyncBatchNorm has no CPU kernel: CPU (gloo) runs keep per-rank batch statistics.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device).train()
    if info.world_size == 1:
        return model, model
    both_branches = config.loss.use_global and config.loss.use_matching
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=not both_branches)
    return model, wrapped


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Group 0: weights (decayed by the schedule); group 1: biases and 1-D params (never decayed)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named_params:
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: ACE) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model.trainable_named_parameters()), lr=0.0, weight_decay=0.0)


def resolve_amp(train: TrainConfig, device: torch.device, amp_dtype: str) -> torch.dtype | None:
    """Mixed precision on GPU only (fp16 + GradScaler, or bf16); CPU runs stay in float32."""
    if amp_dtype not in AMP_DTYPES:
        raise InputError(f"unknown AMP dtype {amp_dtype!r}; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp_dtype] if train.amp and device.type == "cuda" else None


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)
