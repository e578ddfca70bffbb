"""The two-level dense encoder: one forward pass -> a coarse grid (which anatomy) and a fine grid
(where exactly), both unit-norm.

A small convolutional pyramid (stages at strides 2, 4, 8, 16, 32) on the grey image:
    coarse = head(stage16 + up(stage32))         (B, S/16, S/16, D)   the ACE n x n grid
    fine   = FPN top-down 16 -> 8 -> 4, head     (B, S/4,  S/4,  d)
It is fully convolutional: the same weights embed any input side that is a multiple of 32, which
the coarse-to-fine matcher uses for its higher-resolution second look. Built after SAM (Yan et
al., TMI 2022) and CC2D (Yao et al., MICCAI 2021); see docs/model.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ace_model.errors import InputError

DENSE_BACKBONE = "ace_dense_pyramid"  # EncoderSpec.backbone value that selects this model
COARSE_STRIDE = 16
FINE_STRIDE = 4
INPUT_MULTIPLE = 32  # the deepest stage's stride: inputs must be a multiple of it


@dataclass(frozen=True)
class PyramidConfig:
    widths: tuple[int, int, int, int, int] = (24, 48, 64, 96, 128)  # channels at strides 2..32
    coarse_dim: int = 64  # width of the coarse (stride 16) embedding
    fine_dim: int = 64  # width of the fine (stride 4) embedding

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PyramidConfig:
        widths = tuple(int(w) for w in data.get("widths", cls.widths))  # type: ignore[attr-defined]
        if len(widths) != 5 or min(widths) < 1:
            raise InputError(f"widths must be 5 positive channel counts, got {list(widths)}")
        return cls(widths, int(data.get("coarse_dim", 64)), int(data.get("fine_dim", 64)))  # type: ignore[call-overload]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Halve the resolution, then one more 3x3 conv at the new scale."""
    return nn.Sequential(_conv(cin, cout, stride=2), _conv(cout, cout))


class DensePyramid(nn.Module):
    """Grey image pyramid -> (coarse (B, h, w, D), fine (B, H, W, d)), unit-norm, channels last."""

    def __init__(self, config: PyramidConfig | None = None) -> None:
        super().__init__()
        self.config = config or PyramidConfig()
        w = self.config.widths
        self.stages = nn.ModuleList([_stage(1, w[0])] + [_stage(w[i], w[i + 1]) for i in range(4)])
        dc, df = self.config.coarse_dim, self.config.fine_dim
        self.context = nn.Conv2d(w[4], w[3], 1)  # stride-32 context added to stride 16
        self.coarse_head = nn.Sequential(_conv(w[3], w[3]), nn.Conv2d(w[3], dc, 1))
        self.lateral = nn.ModuleList([nn.Conv2d(w[i], df, 1) for i in (1, 2, 3)])  # strides 4, 8, 16
        self.fine_head = nn.Sequential(_conv(df, df), nn.Conv2d(df, df, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, S, S) normalised (channels averaged: grey in) -> coarse, fine grids."""
        _check_side(images.shape[-1])
        x = images.mean(1, keepdim=True)  # (B, 1, S, S): the encoder sees grey levels only
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)  # strides 2, 4, 8, 16, 32
        s4, s8, s16, s32 = feats[1:]
        c16 = s16 + F.interpolate(self.context(s32), size=s16.shape[-2:], mode="nearest")
        coarse = self.coarse_head(c16)  # (B, D, S/16, S/16)
        top = self.lateral[2](s16)
        top = self.lateral[1](s8) + F.interpolate(top, size=s8.shape[-2:], mode="nearest")
        top = self.lateral[0](s4) + F.interpolate(top, size=s4.shape[-2:], mode="bilinear",
                                                  align_corners=False)
        fine = self.fine_head(top)  # (B, d, S/4, S/4)
        return _unit_channels_last(coarse), _unit_channels_last(fine)


def _unit_channels_last(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1).permute(0, 2, 3, 1)  # (B, C, h, w) -> (B, h, w, C)


def _check_side(side: int) -> None:
    if side % INPUT_MULTIPLE:
        raise ValueError(f"the dense encoder needs an input side that is a multiple of {INPUT_MULTIPLE} "
                         f"px, got {side}")
