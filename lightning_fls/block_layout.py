"""One layout for every block-diagonal structure over ``vec`` of a canonical matrix.

``vec(M)`` of a ``[d_out, d_in']`` canonical matrix (row-major, :mod:`lightning_fls.fishleg`) is
cut into consecutive blocks of ``B`` entries; the last block is padded with zeros. FishLeg's
block-diagonal Q, the oBERT Woodbury inverse, M-FAC's blocks and the joint OBS solves all use
this one layout, so their blocks line up entry for entry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_fls._validation import check_positive_int


class BlockLayout:
    """Blocks of ``block_size`` consecutive entries of row-major ``vec`` of a matrix.

    Args:
        shape: The canonical shape ``(d_out, d_in')``.
        block_size: ``B`` (>= 1).

    Attributes:
        numel: ``d_out · d_in'``.
        num_blocks: ``⌈numel / B⌉``.
        padding: Zero entries appended to fill the last block.
    """

    def __init__(self, shape: tuple[int, int], block_size: int) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.numel = self.shape[0] * self.shape[1]
        self.block_size = check_positive_int("block_size", block_size)
        self.num_blocks = math.ceil(self.numel / self.block_size)
        self.padding = self.num_blocks * self.block_size - self.numel

    def to_blocks(self, V: Tensor) -> Tensor:
        """``[..., d_out, d_in']`` → ``[num_blocks, M, B]`` (``M`` the number of matrices)."""
        x = V.reshape(-1, self.numel)
        if self.padding:
            x = F.pad(x, (0, self.padding))
        return x.reshape(x.shape[0], self.num_blocks, self.block_size).transpose(0, 1)

    def from_blocks(self, blocks: Tensor, lead: torch.Size | tuple[int, ...]) -> Tensor:
        """The inverse of :meth:`to_blocks`: ``[num_blocks, M, B]`` → ``[*lead, d_out, d_in']``."""
        x = blocks.transpose(0, 1).reshape(blocks.shape[1], -1)[:, : self.numel]
        return x.reshape(*lead, *self.shape)

    def matrix_blocks(self, matrix: Tensor) -> Tensor:
        """One matrix ``[d_out, d_in']`` (or its ``vec``) as ``[num_blocks, B]`` rows."""
        flat = matrix.reshape(-1)
        if self.padding:
            flat = F.pad(flat, (0, self.padding))
        return flat.reshape(self.num_blocks, self.block_size)

    def from_matrix_blocks(self, rows: Tensor) -> Tensor:
        """The inverse of :meth:`matrix_blocks`: ``[num_blocks, B]`` → ``[d_out, d_in']``."""
        return rows.reshape(-1)[: self.numel].reshape(self.shape)

    def locate(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Block number and position inside the block of flat ``vec`` positions ``index``."""
        return index // self.block_size, index % self.block_size

    def diagonal(self, blocks: Tensor) -> Tensor:
        """``diag`` of a block-diagonal matrix ``[num_blocks, B, B]``, as ``[d_out, d_in']``."""
        return self.from_matrix_blocks(blocks.diagonal(dim1=-2, dim2=-1))
