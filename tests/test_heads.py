"""Heads: shapes, normalisation, and the token orderings of the up/down MLPs (invariant 3)."""

from __future__ import annotations

import torch
from torch import nn

from ace_model.heads import ComposeMLP, DecomposeMLP, DenseHead, DINOHead

CHUNK_CODE = 1000.0  # added to chunk (a, b) as CHUNK_CODE * (2a + b) so each chunk is identifiable


def coordinate_tokens(n: int) -> torch.Tensor:
    """(1, n*n, 2) tokens whose features are their own (row, col), row-major."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(1, n * n, 2).float()


def identifiable_up_layer(dim: int) -> nn.Linear:
    """Linear(D -> 4D): chunk k = input + CHUNK_CODE * k."""
    layer = nn.Linear(dim, 4 * dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim).repeat(4, 1))
        layer.bias.copy_(torch.arange(4).repeat_interleave(dim) * CHUNK_CODE)
    return layer


def test_decompose_chunk_ab_of_token_rc_lands_at_fine_index() -> None:
    n = 6
    up = DecomposeMLP(dim=2)
    up.net = identifiable_up_layer(2)  # type: ignore[assignment]
    fine = up(coordinate_tokens(n))[0]  # (4n^2, 2)
    assert fine.shape == (4 * n * n, 2)
    for r in range(n):
        for c in range(n):
            for a in range(2):
                for b in range(2):
                    expected = torch.tensor([r, c]) + CHUNK_CODE * (2 * a + b)
                    torch.testing.assert_close(fine[(2 * r + a) * 2 * n + (2 * c + b)], expected)


def test_compose_gathers_each_2x2_block() -> None:
    n = 6
    down = ComposeMLP(dim=2)
    down.net = nn.Identity()  # type: ignore[assignment]
    gathered = down(coordinate_tokens(n))[0]  # (n^2/4, 4*2): the MLP's input per coarse token
    assert gathered.shape == (n * n // 4, 8)
    for big_r in range(n // 2):
        for big_c in range(n // 2):
            block = gathered[big_r * (n // 2) + big_c].reshape(4, 2)
            expected = [[2 * big_r + a, 2 * big_c + b] for a in range(2) for b in range(2)]
            torch.testing.assert_close(block, torch.tensor(expected, dtype=torch.float32))


def test_up_and_down_mlp_shapes() -> None:
    tokens = torch.randn(3, 16, 8)
    assert DecomposeMLP(8)(tokens).shape == (3, 64, 8)
    assert ComposeMLP(8)(tokens).shape == (3, 4, 8)


def test_dino_head_last_layer_is_normalised_and_its_gain_frozen() -> None:
    head = DINOHead(dim=16, hidden=32, bottleneck=8, out_dim=64)
    logits = head(torch.randn(5, 16))
    assert logits.shape == (5, 64)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))
    assert logits.abs().max() <= 1 + 1e-5  # unit bottleneck x unit prototypes = cosines


def test_dense_head_is_unit_norm_non_negative_and_row_major() -> None:
    torch.manual_seed(0)
    head = DenseHead(dim=8, blocks=3).eval()  # eval: BN uses running stats, so tokens are independent
    grid = torch.randn(2, 3, 5, 8)  # (B, h, w, D)
    out = head(grid)
    assert out.shape == (2, 15, 8)
    assert (out >= 0).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 15))
    for r in range(3):
        for c in range(5):
            alone = head(grid[:, r : r + 1, c : c + 1])[:, 0]
            torch.testing.assert_close(out[:, r * 5 + c], alone)
