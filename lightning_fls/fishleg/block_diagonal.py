"""Block-diagonal curvature block over the flattened canonical matrix."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_fls._linalg import (
    SUB_BLOCK_SIDES,
    batched,
    chunk_for_side,
    damped_inverse_root,
    sub_problems,
)
from lightning_fls._validation import check_positive
from lightning_fls.block_layout import BlockLayout
from lightning_fls.fishleg.base import CurvatureBlock, QOperator
from lightning_fls.fishleg.statistics import LayerStatistics, StatisticsAccumulator


class _GramProduct(torch.autograd.Function):
    """Rows of ``(L Lᵀ x)ᵀ`` for blocks ``L [m, B, B]`` and rows ``x [m, M, B]``.

    The backward writes ``∂/∂L = gᵀ w + xᵀ (g L)`` with one batched product over the stacked
    vectors: for block-50 the gradient is as large as λ (``m·B²`` floats), so writing it once
    instead of twice (and not adding two copies) is what matters on memory-bound CPUs.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, L: Tensor) -> Tensor:
        w = torch.bmm(x, L)  # rows of (Lᵀ x)ᵀ
        ctx.save_for_backward(x, L, w)
        return torch.bmm(w, L.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, L, w = ctx.saved_tensors
        gL = torch.bmm(grad, L)  # rows of (Lᵀ g)ᵀ
        grad_x = torch.bmm(gL, L.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_L = None
        if ctx.needs_input_grad[1]:
            left = torch.cat([grad, x], dim=1)  # [m, 2M, B]
            right = torch.cat([w, gL], dim=1)
            grad_L = torch.bmm(left.transpose(1, 2), right)
        return grad_x, grad_L


class BlockDiagonalBlock(CurvatureBlock):
    r"""Q block-diagonal over consecutive runs of ``block_size`` entries of ``vec(W)``.

    .. math::

        Q = c\,\operatorname{blockdiag}(L_1 L_1^\top, \dots, L_m L_m^\top),
        \qquad L_j \in \mathbb{R}^{B \times B},

    on the row-major ``vec`` of the canonical matrix, zero-padded to ``m·B`` entries when ``B``
    does not divide ``n = d_out·d_in'`` (Q is then the leading ``n × n`` principal submatrix,
    still positive semi-definite). This is the structure of the FLS paper's timing table and of
    oBERT's block Fisher (B = 50), but it learns the inverse directly. Memory: ``m·B²`` ≈ ``n·B``
    floats. A product is two batched matrix–vector products, ``2·n·B`` multiply-adds, with no
    Gram matrix formed (forming ``L Lᵀ`` would cost ``n·B²``).

    Args:
        shape: Canonical shape ``(d_out, d_in')``.
        block_size: ``B``, the side of each diagonal block (>= 1).
        init_scale: ``c`` at initialisation (``Q₀ = c·I``).
        dtype: Dtype of the auxiliary parameters.
        device: Device of the auxiliary parameters.
    """

    structure: ClassVar[str] = "block_diagonal"
    statistics_needed: ClassVar[frozenset[str]] = frozenset({"block_fisher"})

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        block_size: int = 50,
        init_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(shape, init_scale=init_scale, dtype=dtype, device=device)
        self.layout = BlockLayout(shape, block_size)
        self.block_size = self.layout.block_size
        self.num_blocks = self.layout.num_blocks
        eye = torch.eye(self.block_size, dtype=dtype, device=device)
        self.factors = nn.Parameter(eye.repeat(self.num_blocks, 1, 1))

    @property
    def padding(self) -> int:
        """Number of zero entries appended to ``vec(V)`` to fill the last block."""
        return self.layout.padding

    @override
    def lr_multipliers(self) -> dict[str, float]:
        return {"factors": 1.0 / math.sqrt(self.block_size)}

    @override
    def new_statistics(self) -> StatisticsAccumulator:
        return StatisticsAccumulator(self.statistics_needed, block_size=self.block_size)

    @override
    def operator(self) -> QOperator:
        c = self.base_scale
        L = self.factors

        def apply(V: Tensor) -> Tensor:
            x = self.layout.to_blocks(V)  # [m, M, B]; each row a vector's block
            y: Tensor = _GramProduct.apply(x, L)  # type: ignore[no-untyped-call]
            return c * self.layout.from_blocks(y, V.shape[:-2])

        return apply

    def block_matrices(self) -> tuple[Tensor, int]:
        """The diagonal blocks ``c·L_j L_jᵀ`` of Q, for joint OBS inside blocks.

        Returns:
            ``([num_blocks, B, B], B)``.
        """
        return self.base_scale * torch.bmm(
            self.factors, self.factors.transpose(1, 2)
        ), self.block_size

    @override
    def diag_q(self) -> Tensor:
        # Squared row norms by a contraction that forms no [m, B, B] temporary (as large as λ).
        diag = torch.einsum("mij,mij->mi", self.factors, self.factors).reshape(-1)[: self.numel]
        return self.base_scale * diag.reshape(self.shape)

    @override
    @torch.no_grad()
    def reset_parameters(self, init_scale: float) -> None:
        self.base_scale.fill_(check_positive("init_scale", init_scale))
        self.factors.copy_(torch.eye(self.block_size).expand_as(self.factors))

    @override
    @torch.no_grad()
    def init_from_statistics(self, stats: LayerStatistics, damping: float) -> None:
        """Start at the FishLeg optimum for this structure, or at a diagonal approximation.

        With ``block_fisher`` (the Fisher's diagonal blocks ``F_j``): ``Q_j = (F_j + γI)⁻¹``.
        For a block-diagonal Q, the expected auxiliary loss
        ``Σ_j ½ tr(Q_j (F_j + γI) Q_j) − tr(Q_j)`` separates by block and this is its exact
        minimiser, so no auxiliary step can improve on it for the same data. Otherwise, with
        ``diag_fisher``: ``Q = diag(1 / (diag F + γ))``.

        Args:
            stats: Must hold ``block_fisher`` (of this block size) or ``diag_fisher``.
            damping: γ > 0.

        Raises:
            ValueError: If neither statistic is present, or they have the wrong shape.
        """
        if stats.block_fisher is None:
            q = _damped_inverse_diagonal(stats, damping, self.shape).to(self.device)
            c = q.mean()
            size = self.num_blocks * self.block_size
            entries = torch.ones(size, dtype=self.dtype, device=self.device)
            entries[: self.numel] = (q / c).sqrt().reshape(-1).to(self.dtype)
            self.factors.copy_(torch.diag_embed(entries.reshape(self.num_blocks, self.block_size)))
            self.base_scale.fill_(float(c))
            return
        damping = check_positive("damping", damping)
        blocks = stats.block_fisher
        expected = (self.num_blocks, self.block_size, self.block_size)
        if tuple(blocks.shape) != expected:
            raise ValueError(
                f"`block_fisher` has shape {tuple(blocks.shape)}, expected {expected}."
            )

        in_place = stats.owned and blocks.dtype == self.dtype and blocks.device == self.device
        source = blocks if in_place else blocks.to(self.device)
        factors = _damped_inverse_roots(source, damping, self.dtype, in_place=in_place)
        # ‖R‖² by a reduction that forms no copy (``square().sum(dtype=float64)`` held a
        # float32 and a float64 copy of every factor: 3× the statistics at the peak); c only
        # normalises λ, so Q = c·L Lᵀ is the same whatever its rounding.
        norm = float(torch.linalg.vector_norm(factors))
        scale = norm * norm / (self.num_blocks * self.block_size)
        factors.div_(scale**0.5)
        if in_place:  # the statistics' memory becomes λ's: no second n·B buffer
            self.factors.data = factors
        else:
            self.factors.copy_(factors)
        self.base_scale.fill_(scale)


def _damped_inverse_diagonal(
    stats: LayerStatistics, damping: float, shape: tuple[int, int]
) -> Tensor:
    damping = check_positive("damping", damping)
    diag = stats.diag_fisher
    if diag is None:
        raise ValueError("This block's init_from_statistics needs `diag_fisher`.")
    if tuple(diag.shape) != shape:
        raise ValueError(f"`diag_fisher` has shape {tuple(diag.shape)}, expected {shape}.")
    return 1.0 / (diag.double().clamp_min(0.0) + damping)


_BLOCKS_PER_CHUNK = 512
"""Blocks whose sub-blocks are gathered at once (bounds the copies: 512·B² floats each).

The gathered sub-blocks and their factors are both held until the chunk is written back: with
4096 blocks of 50 that was 80 MB beyond the statistics, and a layer takes this path as soon as
one block has few live coordinates (its zero-padded last block, for one)."""


def _damped_inverse_roots(
    blocks: Tensor, damping: float, dtype: torch.dtype, *, in_place: bool
) -> Tensor:
    """``R_j`` with ``R_j R_jᵀ = (F_j + γI)⁻¹`` for every block, factorising only what lives.

    A coordinate whose Fisher diagonal is 0 (a pruned weight: its statistics are masked; a dead
    input; the padding) has a zero row and column in the PSD ``F_j``, so it decouples:
    ``(F_j + γI)⁻¹`` is ``γ⁻¹`` there and the inverse of the rest elsewhere. Each block is
    therefore factorised on the smallest side that holds its live coordinates
    (:func:`~lightning_fls._linalg.sub_problems`: the live ones first, then dead ones to fill
    the side), and ``R_j`` is that factor on those coordinates and ``γ^{-½}`` on the others.
    The same Q as factorising every ``B × B`` block, for far less work once a layer is sparse:
    the batched ``B × B`` Cholesky is bound by its per-matrix cost, which falls with the side.

    Args:
        blocks: The damped blocks' statistics ``[m, B, B]`` (PSD up to rounding).
        damping: γ > 0.
        dtype: The dtype of the factors.
        in_place: Write the factors over ``blocks`` (else into a new tensor).

    Returns:
        ``[m, B, B]`` factors in ``dtype``.
    """

    def inverse_factor(F_j: Tensor) -> Tensor:
        # R Rᵀ = (F_j + γI)⁻¹ in float64 (R = L⁻ᵀ from Cholesky, or an eigenvalue floor
        # where rounding made F_j + γI indefinite).
        return damped_inverse_root(F_j, damping).to(dtype)

    alive = blocks.diagonal(dim1=-2, dim2=-1) != 0
    below = [side for side in SUB_BLOCK_SIDES if side < blocks.shape[-1]]
    if not below or bool((alive.sum(-1) > below[-1]).all()):  # dense: every block on full side
        return batched(
            inverse_factor,
            blocks,
            chunk=chunk_for_side(blocks.shape[-1]),
            out=blocks if in_place else None,
        )
    out = blocks if in_place else torch.empty_like(blocks, dtype=dtype)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        stop = min(start + _BLOCKS_PER_CHUNK, blocks.shape[0])
        chunk = blocks[start:stop]
        solved: list[tuple[Tensor, Tensor, Tensor]] = []
        for which, index in sub_problems(alive[start:stop]):
            sub = chunk[which.unsqueeze(-1).unsqueeze(-1), index.unsqueeze(-1), index.unsqueeze(-2)]
            solved.append(
                (which, index, batched(inverse_factor, sub, chunk=chunk_for_side(sub.shape[-1])))
            )
        # every sub-block is gathered before any is written (``out`` may be ``blocks``)
        target = out[start:stop]
        target.zero_()
        target.diagonal(dim1=-2, dim2=-1).fill_(damping**-0.5)
        for which, index, factor in solved:
            rows = which.unsqueeze(-1).unsqueeze(-1)
            target[rows, index.unsqueeze(-1), index.unsqueeze(-2)] = factor
    return out
