"""The timm adapter returns (B, h, w, D) in row-major order for ViT, Swin and ConvNeXt families."""

from __future__ import annotations

import pytest
import torch

from ace_model.backbone import Backbone
from ace_model.config import full
from ace_model.method import ACE

FAMILIES = [
    ("vit_tiny_patch16_224", 64),
    ("deit_tiny_distilled_patch16_224", 64),  # two prefix tokens (CLS + distillation)
    ("swin_tiny_patch4_window7_224", 128),  # NHWC output, 4x4 final grid
    ("convnext_atto", 128),  # NCHW output
]


def make_token_local(backbone: Backbone) -> None:
    """Zero every residual branch's last layer: each block becomes the identity, so a final token
    depends on its own input patch only and its position in the output grid becomes observable."""
    for name, module in backbone.model.named_modules():
        if name.endswith(("attn.proj", "mlp.fc2")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def patch_pixels(changed: torch.Tensor, stride: int) -> torch.Tensor:
    """(h, w) bool patch mask -> (h*stride, w*stride) pixel mask."""
    return changed.repeat_interleave(stride, 0).repeat_interleave(stride, 1)


@pytest.fixture(scope="module", params=FAMILIES, ids=[name for name, _ in FAMILIES])
def backbone(request: pytest.FixtureRequest) -> Backbone:
    torch.manual_seed(0)
    name, size = request.param
    return Backbone(name, size).eval()


def test_output_is_a_square_grid_of_final_tokens(backbone: Backbone) -> None:
    h, w = backbone.grid_size
    assert (h, w) == (4, 4) and backbone.stride in (16, 32)
    images = torch.randn(2, 3, backbone.img_size, backbone.img_size)
    with torch.no_grad():
        grid = backbone(images)
        features = backbone.model.forward_features(images)  # type: ignore[operator]
    assert grid.shape == (2, h, w, backbone.dim)
    if features.ndim == 3:  # ViT: prefix tokens dropped, the rest reshaped row-major
        torch.testing.assert_close(grid.reshape(2, h * w, -1), features[:, backbone.num_prefix_tokens :])


def test_token_rc_comes_from_input_patch_rc(backbone: Backbone) -> None:
    """Change an asymmetric set of patches; exactly the tokens at those (row, col) must change."""
    make_token_local(backbone)
    h, w = backbone.grid_size
    stride = int(backbone.stride)
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(1, 3, backbone.img_size, backbone.img_size, generator=generator)
    subsets = [torch.zeros(h, w, dtype=torch.bool) for _ in range(3)]
    subsets[0][0, w - 1] = True  # top-right only: a transposed grid would report bottom-left
    subsets[1][1, 0] = subsets[1][h - 1, 2] = True
    subsets[2] = torch.rand(h, w, generator=generator) < 0.4
    noise = torch.randn(len(subsets), 3, backbone.img_size, backbone.img_size, generator=generator)
    images = torch.cat([base, *(torch.where(patch_pixels(s, stride), n, base) for s, n in
                                zip(subsets, noise, strict=True))])
    with torch.no_grad():
        grid = backbone(images)  # (1 + subsets, h, w, D)
    for index, subset in enumerate(subsets, start=1):
        changed = (grid[index] - grid[0]).abs().amax(-1) > 1e-4
        torch.testing.assert_close(changed, subset)


def test_unknown_backbone_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="timm cannot build backbone 'vit_nonexistent_patch16'"):
        Backbone("vit_nonexistent_patch16", 64)


def test_input_size_must_be_a_multiple_of_the_stride() -> None:
    with pytest.raises(ValueError, match="not a multiple of the backbone stride 16 px"):
        Backbone("vit_tiny_patch16_224", 60)


@pytest.mark.slow
def test_full_preset_builds() -> None:
    model = ACE(full())
    assert model.student.backbone.grid_size == (14, 14)
    assert model.student.backbone.dim == 1024
    assert model.student.dino_head.last_layer.weight.shape == (65536, 256)


def test_the_grid_comes_from_feature_info_without_a_forward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_forward(self: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the constructor ran a forward pass")

    monkeypatch.setattr(Backbone, "forward", no_forward)
    assert Backbone("vit_tiny_patch16_224", 96).grid_size == (6, 6)
    assert Backbone("convnext_atto", 128).grid_size == (4, 4)
