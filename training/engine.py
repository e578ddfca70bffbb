"""Training engine: the loop of `ace train` (AMP, DDP), top-down from `train`.

One optimizer step (docs/training.md, "One optimizer step"): set lr/wd from the schedule arrays;
forward under autocast; scaled backward; unscale; clip each parameter's gradient norm separately
(DINO style); drop the DINO last layer's gradients during the first epoch(s); step; EMA-update
the teacher. Around it: the plan and schedules (training.schedules), the run's state
(training.run_state), checkpoints (training.checkpoints), torchrun (training.distributed).

A run directory holds:
    config.json        the resolved ACEConfig (usable again as --config)
    run.json           the plan (steps, epoch length, global batch), world size, device, data size
    metrics.jsonl      one line per step: losses, lr, weight decay, momentum, throughput
    checkpoints/       step_NNNNNNN.pt (model incl. teacher, optimizer, scaler, step, RNG states)
    replicas.json      distributed runs: each rank's teacher hash (they must all be equal)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ace_model.config import ACEConfig
from ace_model.losses import content_blind_floors
from ace_model.method import ACE, ACEBatch
from training.checkpoints import (
    CHECKPOINT_DIR,
    check_resumable,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from training.data import ACEDataset, EpochSampler, Photometric, collate, resolve_images
from training.distributed import DistInfo, check_replicas, setup_distributed, teardown_distributed
from training.run_config import write_run_config
from training.run_state import Run, autocast, create_run
from training.schedules import Schedules, plan_run

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
REPLICAS_FILE = "replicas.json"


def train(
    config: ACEConfig,
    data_source: str | Path | Sequence[Path],
    out_dir: str | Path,
    max_steps: int | None = None,
    *,
    resume: bool = False,
    device: str | None = None,
    stop_after: int | None = None,
    amp_dtype: str = "float16",
    show_progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Train ACE on a folder / phantom set / explicit image list; returns the final checkpoint.

    max_steps: run length (the schedules span it); default train.epochs epochs.
    resume: continue the latest checkpoint in out_dir exactly (same config and plan).
    stop_after: end this invocation after that many steps in total (resume later).
    threads: torch intra-op threads of this process (default: torch's choice).
    Launch under torchrun for data-parallel training; the process group is joined here.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    images = _image_list(data_source)
    info = setup_distributed(device)
    try:
        run = open_run(config, len(images), Path(out_dir), info, max_steps, resume, amp_dtype)
        stop_at = run.plan.total_steps if stop_after is None else min(run.plan.total_steps, stop_after)
        run_loop(run, images, stop_at, show_progress)
        return finish(run)
    finally:
        teardown_distributed(info)


def open_run(config: ACEConfig, num_images: int, out: Path, info: DistInfo, max_steps: int | None,
             resume: bool, amp_dtype: str) -> Run:
    """A new run with its files written, or the latest checkpoint in `out` continued exactly."""
    checkpoint = _checkpoint_to_resume(out) if resume else None
    if checkpoint is not None and max_steps is None:
        max_steps = int(checkpoint["plan"]["total_steps"])
    plan = plan_run(config.train, num_images, info.world_size, max_steps)
    if checkpoint is not None:
        check_resumable(checkpoint, config, plan)
    run = create_run(config, plan, info, out, amp_dtype)
    if checkpoint is None:
        write_run_files(run, num_images)
    else:
        restore(run, checkpoint)
        truncate_metrics(run, run.step)
    return run


def run_loop(run: Run, images: Sequence[Path], stop_at: int, show_progress: bool) -> None:
    loader, sampler = make_loader(run, images)
    bar = tqdm(total=run.plan.total_steps, initial=run.step, unit="step", dynamic_ncols=True,
               disable=not (show_progress and run.info.is_main))
    meter = Throughput(run.plan.global_batch)
    floors_shown = not run.info.is_main
    while run.step < stop_at:
        sampler.set_epoch(run.epoch)
        sampler.start = (run.step % run.plan.steps_per_epoch) * run.config.train.batch_size
        for batch in loader:
            if not floors_shown:
                print_floors(run, batch, bar)
                floors_shown = True
            parts = train_step(run, batch.to(run.info.device))
            log_step(run, {**step_record(run, parts), **meter.tick()}, bar)
            if is_checkpoint_step(run.step, run.config.train.checkpoint_every) and run.step < stop_at:
                save_checkpoint(run)
            if run.step >= stop_at:
                break
    bar.close()


def train_step(run: Run, batch: ACEBatch) -> dict[str, float]:
    """One optimizer step at run.step; returns the loss parts as floats."""
    step, train_cfg = run.step, run.config.train
    apply_schedules(run.optimizer, run.schedules, step)
    with autocast(run.info.device, run.amp_dtype):
        out = run.forward(batch)
    loss = out["loss"]
    if not run.scaler.is_enabled() and not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --train.lr or check the data")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if train_cfg.clip_grad > 0:
        clip_per_parameter((p for _, p in run.model.trainable_named_parameters()), train_cfg.clip_grad)
    cancel_last_layer_grads(run.model, run.epoch, train_cfg.freeze_last_layer_epochs)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.model.update_teacher(float(run.schedules.momentum[step]))
    run.step += 1
    return {name: float(value.detach()) for name, value in out.items()}


def finish(run: Run) -> Path:
    """Check the replicas (distributed runs) and make sure the last step has a checkpoint."""
    if run.info.world_size > 1:
        hashes = check_replicas(run.model, run.model.teacher, run.info)
        if run.info.is_main:
            (run.out_dir / REPLICAS_FILE).write_text(json.dumps({"teacher_sha256": hashes}, indent=2))
    if run.saved_step != run.step:
        return save_checkpoint(run)
    return checkpoint_path(run.out_dir, run.step)


# ---------------------------------------------------------------------------------------------
# Optimizer step helpers


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, step: int) -> None:
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = float(schedules.lr[step])
        if index == 0:
            group["weight_decay"] = float(schedules.weight_decay[step])


def clip_per_parameter(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale each gradient to norm <= max_norm on its own (DINO style, not a global norm)."""
    for param in params:
        if param.grad is not None:
            norm = torch.linalg.vector_norm(param.grad.float())
            param.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(param.grad.dtype))


def cancel_last_layer_grads(model: ACE, epoch: int, freeze_epochs: int) -> None:
    """The DINO prototypes stay fixed early on, which stabilises the start of training."""
    if epoch < freeze_epochs:
        for param in model.student.dino_head.last_layer.parameters():
            param.grad = None


# ---------------------------------------------------------------------------------------------
# Data, logging and the run directory


def make_loader(run: Run, images: Sequence[Path]) -> tuple[DataLoader[Any], EpochSampler]:
    cfg = run.config
    dataset = ACEDataset(images, cfg.geometry, seed=cfg.train.seed, augment=Photometric())
    sampler = EpochSampler(dataset, run.plan.steps_per_epoch * cfg.train.batch_size,
                           run.info.world_size, run.info.rank, cfg.train.seed)
    workers = cfg.train.num_workers
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate, pin_memory=run.info.device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0,
    )
    return loader, sampler


def print_floors(run: Run, batch: ACEBatch, bar: tqdm) -> None:
    """Once per run: each term's content-blind floor, beside which its loss is read."""
    lc, model = run.config.loss, run.config.model
    floors = content_blind_floors(batch.target_dec, batch.target_comp, model.dino_out, lc.local_form,
                                  lc.alpha_dec, lc.alpha_comp)
    bar.write("content-blind floors (a term at its floor has learned nothing): "
              + ", ".join(f"{k} {v:.4g}" for k, v in floors.items()))


def is_checkpoint_step(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class Throughput:
    """Samples (view pairs) and images per second over the last step, smoothed."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.last = time.perf_counter()
        self.smoothed: float | None = None

    def tick(self) -> dict[str, float]:
        now = time.perf_counter()
        pairs = self.global_batch / max(now - self.last, 1e-9)
        self.last = now
        self.smoothed = pairs if self.smoothed is None else 0.9 * self.smoothed + 0.1 * pairs
        return {"step_s": self.global_batch / pairs, "pairs_per_s": pairs, "images_per_s": 2 * pairs}


def step_record(run: Run, parts: dict[str, float]) -> dict[str, Any]:
    index = run.step - 1
    return {
        "step": run.step, "epoch": index // run.plan.steps_per_epoch, **parts,
        "lr": float(run.schedules.lr[index]), "weight_decay": float(run.schedules.weight_decay[index]),
        "momentum": float(run.schedules.momentum[index]),
    }


def log_step(run: Run, record: dict[str, Any], bar: tqdm) -> None:
    if not run.info.is_main:
        return
    with (run.out_dir / METRICS_FILE).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    shown = {k: f"{record[k]:.4g}" for k in ("loss", "global", "dec", "comp", "lr") if k in record}
    bar.set_postfix(**shown, img_s=f"{record['images_per_s']:.1f}", refresh=False)
    bar.update(1)


def write_run_files(run: Run, num_images: int) -> None:
    if not run.info.is_main:
        return
    run.out_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run.out_dir, run.config)
    info = {"plan": asdict(run.plan), "num_images": num_images, "device": str(run.info.device),
            "amp_dtype": str(run.amp_dtype) if run.amp_dtype else None,
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__}
    (run.out_dir / RUN_FILE).write_text(json.dumps(info, indent=2))


def truncate_metrics(run: Run, step: int) -> None:
    """Drop records of steps after the checkpoint (they are about to be redone)."""
    path = run.out_dir / METRICS_FILE
    if not run.info.is_main or not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def last_record(run_dir: str | Path) -> dict[str, Any]:
    """The last metrics record of a run (step, losses, lr, throughput)."""
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _image_list(data_source: str | Path | Sequence[Path]) -> list[Path]:
    if isinstance(data_source, Sequence) and not isinstance(data_source, str):
        return list(data_source)
    return resolve_images(data_source)


def _checkpoint_to_resume(out: Path) -> dict[str, Any]:
    found = latest_checkpoint(out)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}")
    return load_checkpoint(found)
