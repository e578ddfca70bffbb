"""Phantom generator: CPU time per image, and how often naive template matching fails.

    PYTHONPATH=. .venv/bin/python benchmarks/phantom_difficulty.py [--subjects 16] [--difficulty hard]
        [--grid PNG]

For consecutive subjects (i, i+1), a 32x32 patch around each landmark of subject i is searched in
subject i+1 by normalised cross-correlation (skimage.feature.match_template); a landmark fails when
the peak is more than 5% of the image diagonal from the true point.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.phantoms import (
    DIFFICULTIES,
    LANDMARK_NAMES,
    Phantom,
    PhantomConfig,
    generate_phantom,
    template_matching_errors,
)


def timed_phantoms(count: int, config: PhantomConfig, seed: int) -> tuple[list[Phantom], float]:
    start = time.process_time()
    phantoms = [generate_phantom(subject, seed, config) for subject in range(count)]
    return phantoms, (time.process_time() - start) / count


def write_grid(phantoms: list[Phantom], path: Path, tile: int = 256) -> None:
    """A 2 x 3 grid of downscaled phantoms, the landmarks of the first drawn in red."""
    tiles = []
    for k, phantom in enumerate(phantoms[:6]):
        image = Image.fromarray(phantom.image).convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)
        if k == 0:
            scale = tile / phantom.image.shape[0]
            draw = ImageDraw.Draw(image)
            for x, y in phantom.landmarks.values():
                draw.ellipse([x * scale - 3, y * scale - 3, x * scale + 3, y * scale + 3], fill=(255, 40, 40))
        tiles.append(np.asarray(image))
    rows = [np.concatenate(tiles[i:i + 3], axis=1) for i in (0, 3)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.quantize(colors=128).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--difficulty", choices=DIFFICULTIES, default="standard")
    parser.add_argument("--grid", type=Path, help="also write an example grid PNG here")
    args = parser.parse_args()
    config = PhantomConfig(size=args.size, difficulty=args.difficulty)
    phantoms, cpu = timed_phantoms(args.subjects, config, args.seed)
    print(f"generation ({args.difficulty}): {cpu * 1000:.0f} ms CPU per {args.size}px image "
          f"(mean of {args.subjects})")
    errors = np.stack([template_matching_errors(a, b) for a, b in itertools.pairwise(phantoms)])
    failed = errors > 0.05 * np.hypot(args.size, args.size)
    print(f"NCC 32x32 template matching: {failed.mean():.0%} of {failed.size} landmarks fail "
          f"(> 5% diagonal), median error {np.median(errors):.1f} px")
    for name, rate, median in zip(LANDMARK_NAMES, failed.mean(0), np.median(errors, 0), strict=True):
        print(f"  {name:26s} fail {rate:4.0%}  median {median:6.1f} px")
    if args.grid:
        write_grid(phantoms, args.grid)
        print(f"grid: {args.grid} ({args.grid.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
