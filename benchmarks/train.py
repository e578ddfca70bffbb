"""Training throughput on CPU: optimizer steps of the tiny and cpu presets, measured interleaved.

Every variant (preset x torch threads) gets its own model and one fixed collated batch; rounds
run a few steps of each variant in turn, so machine noise hits all variants alike. Also measures
the data pipeline alone (samples/s of one process: decode from cache, crop, views, augmentation,
targets). Prints a markdown table.

    .venv/bin/python benchmarks/train.py --presets tiny,cpu --threads 1,2 --rounds 3 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ace_model.config import ACEConfig, preset
from ace_model.method import ACEBatch
from training import engine
from training.data import ACEDataset, Photometric, collate, resolve_images


@dataclass
class Variant:
    name: str
    threads: int
    run: engine.Run
    batch: ACEBatch
    step_seconds: list[float]


def synthetic_images(folder: Path, count: int, side: int = 512) -> list[Path]:
    """Smooth random blobs: enough structure for the augmentations to do real work."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    paths = []
    for i in range(count):
        image = 0.3 * yy + 0.2 * xx
        for _ in range(8):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.2)
            image = image + 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        image = (image - image.min()) / (image.max() - image.min())
        paths.append(folder / f"synthetic_{i}.png")
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    return paths


def make_variant(config: ACEConfig, threads: int, images: list[Path]) -> Variant:
    info = engine.setup_distributed("cpu")
    plan = engine.plan_run(config.train, len(images) * 100, 1, max_steps=10_000)
    run = engine.create_run(config, plan, info, Path(tempfile.gettempdir()), "float16")
    dataset = ACEDataset(images, config.geometry, augment=Photometric())
    batch = collate([dataset[i % len(images)] for i in range(config.train.batch_size)])
    return Variant(f"{config.name} (batch {config.train.batch_size})", threads, run, batch, [])


def time_steps(variant: Variant, steps: int) -> None:
    torch.set_num_threads(variant.threads)
    for _ in range(steps):
        start = time.perf_counter()
        engine.train_step(variant.run, variant.batch)
        variant.step_seconds.append(time.perf_counter() - start)


def data_pipeline_rate(config: ACEConfig, images: list[Path], samples: int) -> float:
    """Samples per second of one process with a warm image cache."""
    dataset = ACEDataset(images, config.geometry, augment=Photometric())
    for i in range(len(images)):
        dataset.grey(i)
    start = time.perf_counter()
    for i in range(samples):
        dataset[(1, i % len(images))]
    return samples / (time.perf_counter() - start)


def report(variants: list[Variant], data_rates: dict[str, float]) -> str:
    lines = ["| preset | torch threads | median step (s) | pairs/s | images/s | data, 1 process (pairs/s) |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        median = statistics.median(v.step_seconds)
        pairs = v.run.config.train.batch_size / median
        lines.append(f"| {v.name} | {v.threads} | {median:.3f} | {pairs:.2f} | {2 * pairs:.2f} | "
                     f"{data_rates[v.run.config.name]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,cpu")
    parser.add_argument("--threads", default="1,2", help="torch thread counts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--data", help="image folder or phantom set (default: synthetic images)")
    parser.add_argument("--data-samples", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = resolve_images(args.data)[:32] if args.data else synthetic_images(Path(tmp), 8)
        configs = [preset(name) for name in args.presets.split(",")]
        variants = [make_variant(c, int(t), images) for c in configs for t in args.threads.split(",")]
        for variant in variants:
            time_steps(variant, args.warmup)
            variant.step_seconds.clear()
        for _ in range(args.rounds):
            for variant in variants:
                time_steps(variant, args.steps)
        torch.set_num_threads(1)
        data_rates = {c.name: data_pipeline_rate(c, images, args.data_samples) for c in configs}
    print(report(variants, data_rates))


if __name__ == "__main__":
    main()
