"""Baseline inverse-Fisher estimates against their dense formulas (float64)."""

from __future__ import annotations

import pytest
import torch

from lightning_fls.baselines import (
    BlockWoodburyInverse,
    DiagonalInverse,
    IdentityCurvature,
    MFACInverse,
)
from lightning_fls.block_layout import BlockLayout

F64 = torch.float64


def dense_block_inverse(grads: torch.Tensor, damping: float, block: int) -> torch.Tensor:
    """blockdiag(inv(λI + (1/m) Σ g gᵀ) per block of ``block`` entries of vec), unpadded."""
    m = grads.shape[0]
    flat = grads.reshape(m, -1)
    n = flat.shape[1]
    out = torch.zeros(n, n, dtype=F64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        g = flat[:, start:stop]
        fisher = damping * torch.eye(stop - start, dtype=F64) + g.T @ g / m
        # Padding adds coordinates that are zero in every gradient: they decouple exactly.
        out[start:stop, start:stop] = torch.linalg.inv(fisher)
    return out


@pytest.mark.parametrize(
    ("shape", "block", "chunk"), [((3, 5), 4, 1), ((3, 5), 4, 3), ((2, 7), 50, 5)]
)
def test_woodbury_inverse_equals_dense_block_inverse(shape, block: int, chunk: int) -> None:
    grads = torch.randn(7, *shape, dtype=F64)
    estimate = BlockWoodburyInverse(
        shape, num_gradients=7, damping=0.3, block_size=block, dtype=F64
    )
    for start in range(0, 7, chunk):
        estimate.update(grads[start : start + chunk])
    dense = dense_block_inverse(grads, 0.3, block)
    V = torch.randn(2, *shape, dtype=F64)
    torch.testing.assert_close(estimate.qv(V), (V.reshape(2, -1) @ dense).reshape(V.shape))
    torch.testing.assert_close(estimate.diag_q(), torch.diagonal(dense).reshape(shape))
    with pytest.raises(RuntimeError, match="num_gradients"):
        estimate.update(grads[:1])


@pytest.mark.parametrize(("shape", "block"), [((3, 5), 4), ((40, 33), 10), ((2, 7), 50)])
def test_inverse_from_block_fisher_equals_dense_block_inverse(shape, block: int) -> None:
    grads = torch.randn(9, *shape, dtype=F64)
    grads[:, 0, :2] = 0.0  # pruned coordinates: zero in every gradient
    layout = BlockLayout(shape, block)
    G = layout.to_blocks(grads)  # [num_blocks, m, B]; (40, 33) by 10: 132 blocks, batched
    estimate = BlockWoodburyInverse.from_block_fisher(
        shape, G.transpose(1, 2) @ G / 9, num_gradients=9, damping=0.3
    )
    dense = dense_block_inverse(grads, 0.3, block)
    V = torch.randn(2, *shape, dtype=F64)
    torch.testing.assert_close(estimate.qv(V), (V.reshape(2, -1) @ dense).reshape(V.shape))
    torch.testing.assert_close(estimate.diag_q(), torch.diagonal(dense).reshape(shape))
    with pytest.raises(ValueError, match="`fisher` has shape"):
        BlockWoodburyInverse.from_block_fisher(shape, torch.zeros(1, 3, 3), num_gradients=1,
                                             damping=0.3)  # fmt: skip


@pytest.mark.parametrize(("shape", "block"), [((3, 5), 4), ((4, 4), 2000)])
def test_mfac_inverse_vector_product_equals_dense_formula(shape, block: int) -> None:
    grads = torch.randn(6, *shape, dtype=F64)
    estimate = MFACInverse(grads, damping=0.2, block_size=block)
    dense = dense_block_inverse(grads, 0.2, min(block, shape[0] * shape[1]))
    V = torch.randn(3, *shape, dtype=F64)
    torch.testing.assert_close(estimate.qv(V), (V.reshape(3, -1) @ dense).reshape(V.shape))
    torch.testing.assert_close(estimate.diag_q(), torch.diagonal(dense).reshape(shape))


def test_simple_estimates() -> None:
    V = torch.randn(2, 3)
    assert torch.equal(IdentityCurvature((2, 3)).qv(V), V)
    assert torch.equal(IdentityCurvature((2, 3)).diag_q(), torch.ones(2, 3))
    diag = torch.rand(2, 3)
    inverse = DiagonalInverse(diag, 0.5)
    torch.testing.assert_close(inverse.qv(V), V / (diag + 0.5))
    with pytest.raises(ValueError, match="damping"):
        DiagonalInverse(diag, 0.0)
    with pytest.raises(ValueError, match="grads"):
        MFACInverse(torch.zeros(0, 2, 3), damping=0.1)
