"""timm adapter: any ViT, Swin or ConvNeXt -> a dense token grid (B, h, w, D).

ViT-style models return (B, prefix + h*w, D) normed tokens; prefix tokens (CLS, registers) are
dropped. Swin returns NHWC already; CNNs return NCHW and are permuted. The grid is row-major
(flattening (h, w) gives token t = r * w + c), which the geometry relies on.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from ace_model.errors import InputError


def create_timm_model(name: str, img_size: int, drop_path: float) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "drop_path_rate": drop_path}
    if not name.startswith(("convnext", "resnet")):
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        raise InputError(f"timm cannot build backbone {name!r}: {err}") from err


class Backbone(nn.Module):
    """Wraps a timm model; `forward` returns the final normed tokens as (B, h, w, D)."""

    def __init__(self, name: str, img_size: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.img_size = img_size
        self.model = create_timm_model(name, img_size, drop_path)
        self.dim: int = int(getattr(self.model, "num_features"))  # noqa: B009
        self.num_prefix_tokens: int = int(getattr(self.model, "num_prefix_tokens", 0))
        side = img_size // self.reduction()
        self.grid_size: tuple[int, int] = (side, side)

    def reduction(self) -> int:
        """Input pixels per final token, from timm's feature_info (every ViT, Swin, ConvNeXt and
        ResNet timm builds has it); the coordinate maps need img_size = grid * reduction, so no
        input pixels are silently dropped."""
        info = getattr(self.model, "feature_info", None) or [{}]
        reduction = int(info[-1].get("reduction", 0))
        if not reduction:
            raise InputError(f"{self.name}: timm gives no feature_info reduction for this model, so its "
                             "token grid is unknown; use a ViT, Swin or ConvNeXt backbone")
        if self.img_size % reduction:
            grid = self.img_size // reduction
            raise InputError(
                f"{self.name}: img_size {self.img_size} px is not a multiple of the backbone stride "
                f"{reduction} px (the last {self.img_size - reduction * grid} px would be "
                f"ignored); use {reduction * grid} or {reduction * (grid + 1)}"
            )
        return reduction

    @property
    def stride(self) -> float:
        """Input pixels per token along one side."""
        return self.img_size / self.grid_size[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats: torch.Tensor = getattr(self.model, "forward_features")(images)  # noqa: B009
        if feats.ndim == 3:  # (B, prefix + h*w, D)
            tokens = feats[:, self.num_prefix_tokens :]
            side = int(round(tokens.shape[1] ** 0.5))
            if side * side != tokens.shape[1]:
                raise ValueError(f"{self.name}: {tokens.shape[1]} patch tokens are not a square grid")
            return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2])
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return feats
        return feats.permute(0, 2, 3, 1)  # (B, D, h, w) -> (B, h, w, D)
