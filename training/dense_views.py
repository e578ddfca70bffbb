"""Pairs of views with known geometry for dense training: each view is the source image seen
through its own random affine + elastic warp and photometric change, so every view pixel knows
where it came from in the source. Correspondence between two views (or, through landmarks,
between two subjects) is then a nearest-neighbour question in source coordinates: no inverse
warp is ever needed.

Conventions: continuous pixel coordinates with pixel centres at i + 0.5; a view's grid cell
(r, c) of stride s is centred at ((c + 0.5) s, (r + 0.5) s) view pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ace_model.config import PIXEL_MEAN, PIXEL_STD
from training.dense_config import WarpConfig


@dataclass
class Views:
    images: torch.Tensor  # (B, 1, S, S) normalised model input
    affine: torch.Tensor  # (B, 2, 3) view px -> source px (before the elastic part)
    elastic: torch.Tensor  # (B, 2, k, k) displacement in source px on a coarse lattice
    source_size: torch.Tensor  # (B, 2) source (width, height) in px

    def to_source(self, xy: torch.Tensor) -> torch.Tensor:
        """View pixel coordinates (B, N, 2) -> source pixel coordinates (B, N, 2)."""
        moved = xy @ self.affine[:, :, :2].transpose(1, 2) + self.affine[:, None, :, 2]
        side = self.images.shape[-1]
        where = (xy / side * 2 - 1)[:, :, None, :]  # (B, N, 1, 2) for grid_sample
        shift = F.grid_sample(self.elastic, where, mode="bilinear", padding_mode="border",
                              align_corners=True)  # (B, 2, N, 1)
        return moved + shift[..., 0].transpose(1, 2)


def cell_centres(side_px: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """(n*n, 2) view-pixel (x, y) of the cell centres of a stride-`stride` grid, row-major."""
    n = side_px // stride
    centres = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * stride
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([cols.flatten(), rows.flatten()], dim=-1)


def _rotation(deg: torch.Tensor) -> torch.Tensor:
    theta = torch.deg2rad(deg)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)


def _uniform(low: float, high: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def first_view_affines(sizes: torch.Tensor, cfg: WarpConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, 2) source sizes -> (B, 2, 3) view px -> source px for the first view of each pair."""
    b = sizes.shape[0]
    side = sizes.min(1).values  # (B,)
    zoom = _uniform(*cfg.crop, b, gen) * side / cfg.view_px  # source px per view px
    linear = _rotation(_uniform(-cfg.rotation_deg, cfg.rotation_deg, b, gen)) * zoom[:, None, None]
    jitter = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.centre_jitter * side[:, None]
    centre = sizes / 2 + jitter
    offset = centre - (linear @ torch.full((b, 2, 1), cfg.view_px / 2))[..., 0]
    return torch.cat([linear, offset[..., None]], dim=-1)


def second_view_affines(first: torch.Tensor, cfg: WarpConfig, gen: torch.Generator) -> torch.Tensor:
    """Compose each first view with an extra zoom, rotation and shift about the view centre."""
    b, half = first.shape[0], cfg.view_px / 2
    zoom = _uniform(*cfg.pair_scale, b, gen)
    extra = _rotation(_uniform(-cfg.pair_rotation_deg, cfg.pair_rotation_deg, b, gen)) * zoom[:, None, None]
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * cfg.pair_shift * cfg.view_px
    # view2 px -> view1 px: p1 = extra (p2 - c) + c + shift
    offset = half + shift - (extra @ torch.full((b, 2, 1), half))[..., 0]
    linear = first[:, :, :2] @ extra
    return torch.cat([linear, (first[:, :, :2] @ offset[..., None])[..., 0:1] + first[:, :, 2:]], -1)


def elastic_fields(sizes: torch.Tensor, cfg: WarpConfig, gen: torch.Generator) -> torch.Tensor:
    b, k = sizes.shape[0], cfg.elastic_knots
    amplitude = cfg.elastic * sizes.min(1).values  # (B,)
    return torch.randn(b, 2, k, k, generator=gen) * amplitude[:, None, None, None] / 2


def render(sources: torch.Tensor, views: Views) -> torch.Tensor:
    """Sample each source (B, 1, H, W) in [0, 1] through its view's warp -> (B, 1, S, S) in [0, 1].
    Outside the source is black, as letterbox padding is at inference."""
    side = views.images.shape[-1]
    b = sources.shape[0]
    pixel = cell_centres(side, 1).expand(b, -1, -1)  # (B, S*S, 2)
    src = views.to_source(pixel)
    size = views.source_size[:, None, :]
    grid = (src / size * 2 - 1).view(b, side, side, 2)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def photometric(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image gamma, contrast, brightness, blur and noise on (B, 1, S, S) in [0, 1]."""
    b = images.shape[0]
    gamma = torch.exp(_uniform(-0.4, 0.4, b, gen))[:, None, None, None]
    out = images.clamp(0, 1) ** gamma
    contrast = _uniform(0.7, 1.3, b, gen)[:, None, None, None]
    bright = _uniform(-0.1, 0.1, b, gen)[:, None, None, None]
    out = (out - 0.5) * contrast + 0.5 + bright
    out = _maybe_blur(out, gen)
    sigma = _uniform(0.0, 0.04, b, gen)[:, None, None, None]
    out = out + sigma * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1) * (images > 0)  # keep the black outside black (letterbox-like)


def _maybe_blur(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = float(_uniform(0.0, 1.2, 1, gen))
    if sigma < 0.3:
        return images
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def make_view_pair(sources: torch.Tensor, cfg: WarpConfig, gen: torch.Generator) -> tuple[Views, Views]:
    """Two warped, photometrically changed views of each source image (B, 1, H, W) in [0, 1]."""
    b, _, h, w = sources.shape
    sizes = torch.tensor([[w, h]], dtype=torch.float32).expand(b, 2)
    first = first_view_affines(sizes, cfg, gen)
    affines = (first, second_view_affines(first, cfg, gen))
    pair = []
    for affine in affines:
        blank = torch.zeros(b, 1, cfg.view_px, cfg.view_px)
        views = Views(blank, affine, elastic_fields(sizes, cfg, gen), sizes)
        pixels = photometric(render(sources, views), gen)
        pair.append(Views((pixels - PIXEL_MEAN) / PIXEL_STD, affine, views.elastic, sizes))
    return pair[0], pair[1]
