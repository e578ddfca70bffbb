"""Encoder throughput and ACE training-step time, measured interleaved in one process.

    nice .venv/bin/python benchmarks/encoder.py [--rounds 5] [--threads 1,2] [--device auto]

Encoder: the `cpu` preset's inference encoder (random weights) at batch 1, 8 and 32, visited
round-robin so that machine noise hits every batch size alike; ratios are against batch 1.
Training: one full ACE step (forward of student and teacher, backward, AdamW, EMA update) of the
`tiny` and `cpu` presets at their configured batch sizes, also round-robin. `--threads 1,2` adds
the intra-op thread count to the interleaved variants (on a shared, oversubscribed machine one
thread can beat two by a wide margin).
Prints markdown tables; figures and the command go to benchmarks/encoder.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from ace_model.config import PIXEL_MEAN, PIXEL_STD, ACEConfig, preset
from ace_model.encoder import Encoder, EncoderSpec
from ace_model.geometry import composition_target, cut_views, decomposition_target, overlap_masks, sample_pair
from ace_model.method import ACE, ACEBatch

Variant = tuple[int, str]  # (threads, batch size or preset name)
ENCODER_BATCHES = (1, 8, 32)
IMAGES_PER_SAMPLE = 32  # each encoder measurement embeds this many images, whatever the batch size
TRAIN_PRESETS = ("tiny", "cpu")


def synthetic_batch(config: ACEConfig, rng: np.random.Generator) -> ACEBatch:
    """Random grey base images cut into exact view pairs: the shapes of real training."""
    geo = config.geometry
    columns: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for _ in range(config.train.batch_size):
        pair = sample_pair(rng, geo.grid, geo.n)
        base = np.repeat(rng.random((geo.base_px, geo.base_px, 1), dtype=np.float32), 3, axis=2)
        large, small = cut_views(base, pair, geo.cell, geo.n)
        views = [(torch.from_numpy(v).permute(2, 0, 1) - PIXEL_MEAN) / PIXEL_STD for v in (large, small)]
        masks = [torch.from_numpy(m) for m in overlap_masks(pair, geo.n)]
        targets = [torch.from_numpy(t(pair, geo.n)) for t in (decomposition_target, composition_target)]
        for column, value in zip(columns, [*views, *masks, *targets], strict=True):
            column.append(value)
    return ACEBatch(*(torch.stack(column) for column in columns))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_runner(encoder: Encoder, batch: int, device: torch.device) -> Callable[[], None]:
    images = torch.randn(batch, 3, encoder.spec.img_size, encoder.spec.img_size, device=device)
    calls = max(1, IMAGES_PER_SAMPLE // batch)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(calls):
                encoder(images)
        synchronize(device)

    return run


def train_runner(name: str, device: torch.device) -> Callable[[], None]:
    config = preset(name)
    torch.manual_seed(0)
    model = ACE(config).to(device).train()
    optimizer = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-5)
    batch = synthetic_batch(config, np.random.default_rng(0)).to(device)

    def run() -> None:
        loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_teacher(0.996)
        synchronize(device)

    return run


def with_threads(threads: int, run: Callable[[], None]) -> Callable[[], None]:
    """Run with `threads` intra-op threads (0 = leave torch's setting alone)."""

    def run_with_threads() -> None:
        if threads:
            torch.set_num_threads(threads)
        run()

    return run_with_threads


def round_robin(
    runners: dict[Variant, Callable[[], None]], rounds: int, label: str
) -> dict[Variant, list[float]]:
    """Seconds per call of every runner, visited in turn each round after one warm-up call."""
    for run in runners.values():
        run()
    times: dict[Variant, list[float]] = {name: [] for name in runners}
    for _ in tqdm(range(rounds), desc=label, unit="round"):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def encoder_table(rounds: int, device: torch.device, thread_counts: list[int]) -> str:
    spec = EncoderSpec(preset("cpu").model.backbone, preset("cpu").model.img_size)
    encoder = Encoder(spec).to(device)
    runners = {(t, str(b)): with_threads(t, encoder_runner(encoder, b, device))
               for t in thread_counts for b in ENCODER_BATCHES}
    times = round_robin(runners, rounds, "encoder")
    rows = ["| threads | batch | median s / 32 images | images/s | vs batch 1 | vs first thread count | "
            "spread (max/min) |", "|---|---|---|---|---|---|---|"]
    for (threads, batch), samples in times.items():
        median = statistics.median(samples)
        vs_batch = statistics.median(times[(threads, "1")]) / median
        vs_threads = statistics.median(times[(thread_counts[0], batch)]) / median
        rows.append(f"| {threads or 'default'} | {batch} | {median:.3f} | {IMAGES_PER_SAMPLE / median:.1f} | "
                    f"{vs_batch:.2f}x | {vs_threads:.2f}x | {max(samples) / min(samples):.2f} |")
    return f"Encoder `{spec.backbone}` at {spec.img_size} px (cpu preset), fp32 eager\n\n" + "\n".join(rows)


def train_table(rounds: int, device: torch.device, thread_counts: list[int]) -> str:
    runners = {(t, name): with_threads(t, train_runner(name, device))
               for t in thread_counts for name in TRAIN_PRESETS}
    times = round_robin(runners, rounds, "train step")
    rows = ["| threads | preset | backbone @ px | batch (pairs) | median s / step | pairs/s | "
            "vs first thread count | spread (max/min) |", "|---|---|---|---|---|---|---|---|"]
    for (threads, name), samples in times.items():
        config, median = preset(name), statistics.median(samples)
        vs_threads = statistics.median(times[(thread_counts[0], name)]) / median
        model = f"{config.model.backbone} @ {config.model.img_size}"
        pairs = config.train.batch_size
        rows.append(f"| {threads or 'default'} | {name} | {model} | {pairs} | {median:.3f} | "
                    f"{pairs / median:.2f} | {vs_threads:.2f}x | {max(samples) / min(samples):.2f} |")
    return "ACE training step (student+teacher forward, backward, AdamW, EMA), fp32\n\n" + "\n".join(rows)


def parse_threads(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError as err:
        raise SystemExit(f"--threads takes comma-separated integers such as 1,2; got {text!r}") from err
    if not counts or any(c < 0 for c in counts):
        raise SystemExit(f"--threads needs non-negative counts; got {text!r}")
    return counts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is visible")
    return device


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.machine()}, load average {load:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed round-robin rounds per table")
    parser.add_argument("--threads", default="0",
                        help="comma-separated intra-op thread counts to interleave, e.g. 1,2 (0 = default)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:i]")
    args = parser.parse_args()
    thread_counts = parse_threads(args.threads)
    device = resolve_device(args.device)
    print(f"machine: {machine_line()}, device {device}\n")
    print(encoder_table(args.rounds, device, thread_counts) + "\n")
    print(train_table(args.rounds, device, thread_counts) + "\n")
    print(f"after: {machine_line()}")


if __name__ == "__main__":
    main()
