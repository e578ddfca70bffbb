"""Image folders the tests write (modules share them from here, never from each other)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

DATASET_SIZES = [(96, 64), (64, 64), (50, 80), (120, 60), (64, 96), (70, 70)]  # (width, height)


def write_images(folder: Path, count: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:110] / 120.0
    paths = []
    for i in range(count):
        image = 0.4 * yy + 0.2 * xx
        for _ in range(5):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            image = image + 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        image = (image - image.min()) / (image.max() - image.min())
        paths.append(folder / f"img{i}.png")
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    return paths


def write_dataset(folder: Path, sizes: list[tuple[int, int]], prefix: str = "im") -> Path:
    """A landmark-style data set: images/*.png + metadata.csv (two images per patient)."""
    rng = np.random.default_rng(len(prefix))
    (folder / "images").mkdir(parents=True)
    with (folder / "metadata.csv").open("w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(["image", "image_id", "patient_id"])
        for i, (width, height) in enumerate(sizes):
            pixels = (rng.random((height, width)) * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / "images" / f"{prefix}{i}.png")
            writer.writerow([f"images/{prefix}{i}.png", f"{prefix}{i}", f"pat{i // 2}"])
    return folder
