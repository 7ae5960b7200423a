"""The one block layout over row-major vec of a canonical matrix."""

from __future__ import annotations

import torch

from lightning_fls.block_layout import BlockLayout


def test_blocks_are_consecutive_runs_of_vec_padded_with_zeros() -> None:
    layout = BlockLayout((3, 5), 4)  # 15 entries: 4 blocks, 1 padding entry
    assert (layout.num_blocks, layout.padding) == (4, 1)
    V = torch.arange(2 * 15, dtype=torch.float64).reshape(2, 3, 5)
    blocks = layout.to_blocks(V)
    assert blocks.shape == (4, 2, 4)
    for m in range(2):
        flat = torch.cat([V[m].flatten(), torch.zeros(1, dtype=V.dtype)])
        assert torch.equal(blocks[:, m], flat.reshape(4, 4))
    assert torch.equal(layout.from_blocks(blocks, (2,)), V)
    assert torch.equal(layout.matrix_blocks(V[1]), blocks[:, 1])
    assert torch.equal(layout.from_matrix_blocks(layout.matrix_blocks(V[1])), V[1])


def test_locate_and_diagonal_agree_with_the_dense_block_diagonal_matrix() -> None:
    layout = BlockLayout((2, 5), 3)  # 10 entries, 4 blocks, 2 padding
    blocks = torch.randn(4, 3, 3, dtype=torch.float64)
    dense = torch.block_diag(*blocks)[:10, :10]
    index = torch.tensor([[0, 4, 9], [2, 3, 7]])
    block, position = layout.locate(index)
    for g in range(2):
        for a in range(3):
            i = int(index[g, a])
            assert dense[i, i] == blocks[block[g, a], position[g, a], position[g, a]]
    assert torch.equal(layout.diagonal(blocks), dense.diagonal().reshape(2, 5))
