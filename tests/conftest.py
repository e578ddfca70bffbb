"""Shared fixtures: a synthetic ACE batch factory (tiny preset scale)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from ace_model.config import PIXEL_MEAN, PIXEL_STD, ACEConfig
from ace_model.geometry import composition_target, cut_views, decomposition_target, overlap_masks, sample_pair
from ace_model.method import ACEBatch

BatchFactory = Callable[[ACEConfig, int, int], ACEBatch]


def smooth_base_image(rng: np.random.Generator, side: int) -> np.ndarray:
    """A structured grey base image (side, side, 3) in [0, 1]: blobs on a gradient."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    image = 0.3 * yy + 0.2 * xx
    for _ in range(6):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        radius = rng.uniform(0.05, 0.2)
        image += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    image = (image - image.min()) / (image.max() - image.min())
    return np.repeat(image[:, :, None], 3, axis=2).astype(np.float32)


def _to_input(view: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1) - PIXEL_MEAN) / PIXEL_STD


def build_batch(config: ACEConfig, batch_size: int, seed: int) -> ACEBatch:
    geo = config.geometry
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(batch_size):
        pair = sample_pair(rng, geo.grid, geo.n)
        large, small = cut_views(smooth_base_image(rng, geo.base_px), pair, geo.cell, geo.n)
        mask_l, mask_s = overlap_masks(pair, geo.n)
        samples.append((
            _to_input(large), _to_input(small), torch.from_numpy(mask_l), torch.from_numpy(mask_s),
            torch.from_numpy(decomposition_target(pair, geo.n)),
            torch.from_numpy(composition_target(pair, geo.n)),
        ))
    return ACEBatch(*(torch.stack(column) for column in zip(*samples, strict=True)))


@pytest.fixture
def make_batch() -> BatchFactory:
    """`make_batch(config, batch_size, seed)` -> a synthetic ACEBatch with exact targets."""
    return build_batch
