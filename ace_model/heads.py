"""Pure modules: DINO head, dense head, decomposition (up) and composition (down) MLPs
(docs/model.md, "Heads")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """MLP D->hidden->hidden->bottleneck, L2-normalise, weight-normed Linear(bottleneck->K)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.mlp.apply(_trunc_normal_init)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        # norm_last_layer=True: the weight-norm gain g is fixed to 1.
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


class DenseHead(nn.Module):
    """(1x1 conv, BN, ReLU) x blocks on the token map, then per-token L2 norm."""

    def __init__(self, dim: int, blocks: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(blocks):
            conv = nn.Conv2d(dim, dim, kernel_size=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
            layers += [conv, nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, h, w, D) -> unit-norm tokens (B, h*w, D)."""
        x = self.net(grid.permute(0, 3, 1, 2))  # (B, D, h, w)
        return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


class DecomposeMLP(nn.Module):
    """Each token -> 2x2 finer tokens: (B, n*n, D) -> (B, 2n*2n, D), row-major on the fine grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 4 * dim, bias=False), nn.LayerNorm(4 * dim), nn.ReLU(inplace=True),
            nn.Linear(4 * dim, 4 * dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, hw, d = tokens.shape
        n = int(round(hw**0.5))
        x = self.net(tokens).reshape(b, n, n, 2, 2, d)  # chunk (a, b) of token (r, c)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (B, r, a, c, b, D): fine row 2r+a, fine col 2c+b
        return x.reshape(b, 4 * hw, d)


class ComposeMLP(nn.Module):
    """Each 2x2 token block -> one coarser token: (B, n*n, D) -> (B, n*n/4, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4 * dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True),
            nn.Linear(dim, dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, hw, d = tokens.shape
        n = int(round(hw**0.5))
        x = tokens.reshape(b, n // 2, 2, n // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
        return self.net(x.reshape(b, hw // 4, 4 * d))  # block (a, b) gathered in (row, col) order
