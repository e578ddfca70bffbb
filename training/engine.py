"""Training engine: optimizer, per-step schedules, the loop (AMP, DDP), checkpoint/resume, export.

One optimizer step (spec 5): set lr/wd from the schedule arrays; forward under autocast; scaled
backward; unscale; clip each parameter's gradient norm separately (DINO style); drop the DINO last
layer's gradients during the first epoch(s); step; EMA-update the teacher.

A run directory holds:
    config.json        the resolved ACEConfig (usable again as --config)
    run.json           the plan (steps, epoch length, global batch), world size, device, data size
    metrics.jsonl      one line per step: losses, lr, weight decay, momentum, throughput
    checkpoints/       step_NNNNNNN.pt (model incl. teacher, optimizer, scaler, step, RNG states)
    replicas.json      distributed runs: each rank's teacher hash (they must all be equal)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ace_model.backbone import Backbone
from ace_model.config import ACEConfig, TrainConfig
from ace_model.encoder import Encoder, EncoderSpec, encoder_from_backbone
from ace_model.losses import content_blind_floors
from ace_model.method import ACE, ACEBatch
from training.data import ACEDataset, EpochSampler, Photometric, collate, resolve_images

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
REPLICAS_FILE = "replicas.json"
KEEP_CHECKPOINTS = 2  # older periodic checkpoints are deleted
LR_REFERENCE_BATCH = 256  # lr is given per 256 images (linear scaling rule)
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Schedules (per-step arrays)


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


def plan_run(train: TrainConfig, num_images: int, world_size: int, max_steps: int | None) -> RunPlan:
    """Epoch length from the data size (or train.steps_per_epoch); length = max_steps or epochs."""
    global_batch = train.batch_size * world_size
    steps_per_epoch = train.steps_per_epoch or num_images // global_batch
    if steps_per_epoch < 1:
        raise ValueError(
            f"{num_images} training images are fewer than one global batch ({global_batch}); "
            "add images, lower --train.batch_size or set --train.steps_per_epoch"
        )
    total = max_steps if max_steps is not None else train.epochs * steps_per_epoch
    if total < 1:
        raise ValueError(f"the run must have at least one step, got {total}")
    return RunPlan(total, steps_per_epoch, global_batch, world_size)


def build_schedules(train: TrainConfig, plan: RunPlan) -> Schedules:
    peak_lr = train.lr * plan.global_batch / LR_REFERENCE_BATCH
    warmup = round(train.warmup_epochs * plan.steps_per_epoch)
    return Schedules(
        lr=cosine_schedule(peak_lr, train.min_lr, plan.total_steps, warmup),
        weight_decay=cosine_schedule(train.weight_decay, train.weight_decay_end, plan.total_steps),
        momentum=cosine_schedule(train.ema_momentum, 1.0, plan.total_steps),
    )


# ---------------------------------------------------------------------------------------------
# Optimizer and gradient handling


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Group 0: weights (decayed by the schedule); group 1: biases and 1-D params (never decayed)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named_params:
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: ACE) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model.trainable_named_parameters()), lr=0.0, weight_decay=0.0)


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
# Devices and processes


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested not in (None, "auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}; use cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA device is visible")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(requested_device: str | None) -> DistInfo:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (NCCL on GPU, else gloo)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)
    return DistInfo(0, 1, local_rank, device, owns)


def teardown_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


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


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def resolve_amp(train: TrainConfig, device: torch.device, amp_dtype: str) -> torch.dtype | None:
    """Mixed precision on GPU only (spec 5: fp16 + GradScaler); CPU runs stay in float32."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"unknown AMP dtype {amp_dtype!r}; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp_dtype] if train.amp and device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# The run


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
            record = {**step_record(run, parts), **meter.tick()}
            log_step(run, record, bar)
            if is_checkpoint_step(run.step, run.config.train.checkpoint_every) and run.step < stop_at:
                save_checkpoint(run)
            if run.step >= stop_at:
                break
    bar.close()


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


# ---------------------------------------------------------------------------------------------
# Checkpoints


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


def gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    if info.world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, rng_state())
    return states


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def save_checkpoint(run: Run) -> Path:
    """Written by rank 0 (temp file + rename); every rank must call it (RNG states are gathered)."""
    rng = gather_rng_states(run.info)
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


def _normalised(data: Any) -> Any:
    return json.loads(json.dumps(data))


def check_resumable(checkpoint: dict[str, Any], config: ACEConfig, plan: RunPlan) -> None:
    """Exact continuation needs the same config and plan; say what differs otherwise."""
    saved = flatten(_normalised(checkpoint["config"]))
    current = flatten(_normalised(config.to_dict()))
    differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differ:
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {differ}; "
                         "resume with the run's own config (omit --preset/--config/overrides)")
    saved_plan = RunPlan(**checkpoint["plan"])
    if saved_plan != plan:
        raise ValueError(f"cannot resume: the checkpoint was planned as {saved_plan}, this run as {plan} "
                         "(same --max-steps, data size and number of processes are required)")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def restore(run: Run, checkpoint: dict[str, Any]) -> None:
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.step = run.saved_step = int(checkpoint["step"])
    truncate_metrics(run, run.step)
    states = checkpoint["rng"]
    if len(states) == run.info.world_size:
        set_rng_state(states[run.info.rank])


def truncate_metrics(run: Run, step: int) -> None:
    """Drop records of steps after the checkpoint (they are about to be redone)."""
    path = run.out_dir / METRICS_FILE
    if not run.info.is_main or not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------
# Replica consistency (distributed runs)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers everywhere (BN running statistics drift apart without SyncBatchNorm)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas(run: Run) -> list[str]:
    """Every rank's teacher hash; raises if the ranks' teachers differ."""
    broadcast_buffers(run.model)
    hashes: list[Any] = [None] * run.info.world_size
    dist.all_gather_object(hashes, state_hash(run.model.teacher))
    if len(set(hashes)) != 1:
        raise RuntimeError(f"distributed ranks diverged: teacher hashes {hashes}")
    return hashes


# ---------------------------------------------------------------------------------------------
# Entry points


def write_run_files(run: Run, num_images: int) -> None:
    if not run.info.is_main:
        return
    run.out_dir.mkdir(parents=True, exist_ok=True)
    (run.out_dir / CONFIG_FILE).write_text(json.dumps(run.config.to_dict(), indent=2))
    info = {"plan": asdict(run.plan), "num_images": num_images, "device": str(run.info.device),
            "amp_dtype": str(run.amp_dtype) if run.amp_dtype else None,
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__}
    (run.out_dir / RUN_FILE).write_text(json.dumps(info, indent=2))


def _read_checkpoint_for_resume(out_dir: Path) -> dict[str, Any]:
    found = latest_checkpoint(out_dir)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir / CHECKPOINT_DIR}")
    return load_checkpoint(found)


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
    out = Path(out_dir)
    images = list(data_source) if isinstance(data_source, Sequence) and not isinstance(
        data_source, str) else resolve_images(data_source)
    info = setup_distributed(device)
    try:
        checkpoint = _read_checkpoint_for_resume(out) if resume else None
        if checkpoint is not None and max_steps is None:
            max_steps = int(checkpoint["plan"]["total_steps"])
        plan = plan_run(config.train, len(images), info.world_size, max_steps)
        if checkpoint is not None:
            check_resumable(checkpoint, config, plan)
        run = create_run(config, plan, info, out, amp_dtype)
        if checkpoint is not None:
            restore(run, checkpoint)
        else:
            write_run_files(run, len(images))
        stop_at = min(plan.total_steps, stop_after) if stop_after is not None else plan.total_steps
        run_loop(run, images, stop_at, show_progress)
        return finish(run)
    finally:
        teardown_distributed(info)


def finish(run: Run) -> Path:
    if run.info.world_size > 1:
        hashes = check_replicas(run)
        if run.info.is_main:
            (run.out_dir / REPLICAS_FILE).write_text(json.dumps({"teacher_sha256": hashes}, indent=2))
    if run.saved_step != run.step:
        return save_checkpoint(run)
    return checkpoint_path(run.out_dir, run.step)


def export_encoder(checkpoint: str | Path, out_dir: str | Path) -> Encoder:
    """The teacher backbone of a checkpoint (file or run dir) as an encoder artifact in out_dir."""
    state = load_checkpoint(checkpoint)
    config = ACEConfig.from_dict(state["config"])
    backbone = Backbone(config.model.backbone, config.model.img_size, drop_path=0.0)
    prefix = "teacher.backbone."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    backbone.load_state_dict(weights)
    provenance = {"source": "ace train", "checkpoint": str(Path(checkpoint).resolve()),
                  "step": int(state["step"]), "total_steps": int(state["plan"]["total_steps"]),
                  "config": _normalised(config.to_dict())}
    encoder = encoder_from_backbone(backbone, provenance)
    encoder.save(out_dir)
    return encoder


def init_encoder(config: ACEConfig, out_dir: str | Path, seed: int = 0) -> Encoder:
    """A randomly initialised encoder artifact (the random-init baseline)."""
    torch.manual_seed(seed)
    spec = EncoderSpec(config.model.backbone, config.model.img_size,
                       provenance={"source": "random init", "seed": seed,
                                   "config": _normalised(config.to_dict())})
    encoder = Encoder(spec)
    encoder.save(out_dir)
    return encoder


def is_main_process() -> bool:
    """Rank 0, also before/after the process group exists (torchrun sets RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def last_record(run_dir: str | Path) -> dict[str, Any]:
    """The last metrics record of a run (step, losses, lr, throughput)."""
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}
