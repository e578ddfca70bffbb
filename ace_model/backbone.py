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


def create_timm_model(name: str, img_size: int, drop_path: float) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "drop_path_rate": drop_path}
    if not name.startswith(("convnext", "resnet")):
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        raise ValueError(f"timm cannot build backbone {name!r}: {err}") from err


class Backbone(nn.Module):
    """Wraps a timm model; `forward` returns the final normed tokens as (B, h, w, D)."""

    def __init__(self, name: str, img_size: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.img_size = img_size
        self.model = create_timm_model(name, img_size, drop_path)
        self.dim: int = int(getattr(self.model, "num_features"))  # noqa: B009
        self.num_prefix_tokens: int = int(getattr(self.model, "num_prefix_tokens", 0))
        with torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            probe = self.forward(torch.zeros(1, 3, img_size, img_size))
            self.model.train(was_training)
        self.grid_size: tuple[int, int] = (int(probe.shape[1]), int(probe.shape[2]))
        self._check_stride()

    def _check_stride(self) -> None:
        """The coordinate maps assume img_size = grid * stride: no input pixels silently dropped."""
        info = getattr(self.model, "feature_info", None) or [{}]
        reduction = int(info[-1].get("reduction", 0))
        if reduction and reduction * self.grid_size[0] != self.img_size:
            raise ValueError(
                f"{self.name}: img_size {self.img_size} px is not a multiple of the backbone stride "
                f"{reduction} px (the last {self.img_size - reduction * self.grid_size[0]} px would be "
                f"ignored); use {reduction * self.grid_size[0]} or {reduction * (self.grid_size[0] + 1)}"
            )

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
