"""Inverse-Fisher estimates of the baseline pruners, behind the same Q·V / diag(Q) interface.

Each estimate acts on one layer's canonical matrix ``[d_out, d_in']`` (see
:mod:`lightning_fls.fishleg`) so that the OBS code (:mod:`lightning_fls.obs`) and the masks are
shared by every method:

* :class:`IdentityCurvature` — ``Q = I``: OBS with it is global magnitude pruning.
* :class:`DiagonalInverse` — ``Q = diag(1/(diag F + λ))``, the empirical diagonal Fisher.
* :class:`BlockWoodburyInverse` — oBERT / WoodFisher (Kurtic et al. 2022; Singh & Alistarh
  2020): ``F_B = λI + (1/m) Σ_i g_i g_iᵀ`` on blocks of ``B`` consecutive entries of ``vec(W)``,
  inverted by the Woodbury recursion ``F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (m + gᵀF⁻¹g)``, applied here
  ``k`` gradients at a time (``F⁻¹ ← F⁻¹ − F⁻¹Gᵀ (m I_k + G F⁻¹ Gᵀ)⁻¹ G F⁻¹``, the same result),
  or by inverting each damped block of ``(1/m) Σ g gᵀ`` once (the same inverse; what the
  ``obert`` method uses). Memory ``O(n·B)``.
* :class:`MFACInverse` — static M-FAC (Frantar et al. 2021): the same estimator, kept
  matrix-free as ``m`` vectors per block: ``F⁻¹x = λ⁻¹(x − Gᵀ(mλI + G Gᵀ)⁻¹ G x)``, through the
  Cholesky factor of the ``m × m`` matrix (equal to M-FAC's recursion). Memory ``O(n·m)``.

``g_i`` are gradients of the mean loss over mini-batches (data labels), masked by the current
pruning mask before they enter the estimate, as in SparseML.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_fls._linalg import (
    batched,
    chunk_for_side,
    damped_inverse,
    robust_cholesky,
    spd_solve,
)
from lightning_fls._validation import check_positive, check_positive_int
from lightning_fls.block_layout import BlockLayout


class IdentityCurvature:
    """``Q = I``: OBS saliency ``w²/2`` and no correction, i.e. magnitude pruning.

    Args:
        shape: Canonical shape ``(d_out, d_in')``.
        device: Device of ``diag_q``.
    """

    def __init__(self, shape: tuple[int, int], device: torch.device | str | None = None) -> None:
        self.shape = shape
        self.device = device

    def qv(self, V: Tensor) -> Tensor:
        """``V`` itself.

        Args:
            V: ``[..., d_out, d_in']``.

        Returns:
            ``V``.
        """
        return V

    def diag_q(self) -> Tensor:
        """Ones.

        Returns:
            ``[d_out, d_in']`` of ones.
        """
        return torch.ones(self.shape, device=self.device)


class DiagonalInverse:
    """``Q = diag(1 / (diag F + λ))`` from a diagonal Fisher estimate.

    Args:
        diag_fisher: ``diag F`` in canonical layout ``[d_out, d_in']``.
        damping: λ > 0.
    """

    def __init__(self, diag_fisher: Tensor, damping: float) -> None:
        self.q = 1.0 / (diag_fisher.clamp_min(0.0) + check_positive("damping", damping))

    def qv(self, V: Tensor) -> Tensor:
        """``Q·V``, elementwise.

        Args:
            V: ``[..., d_out, d_in']``.

        Returns:
            ``Q·V``.
        """
        return self.q * V

    def diag_q(self) -> Tensor:
        """``diag(Q)``.

        Returns:
            ``[d_out, d_in']``.
        """
        return self.q


class BlockWoodburyInverse:
    """oBERT / WoodFisher: explicit inverses of damped block empirical Fishers.

    Start with :meth:`__init__`, feed gradients with :meth:`update` (all ``m`` of them, ``m``
    fixed in advance as in oBERT), then use :meth:`qv` and :meth:`diag_q`; or build the same
    inverse from the block Fisher ``(1/m) Σ g gᵀ`` with :meth:`from_block_fisher` (what
    ``method="obert"`` does: it can be gathered batch by batch before ``m`` and λ are known).

    Args:
        shape: Canonical shape ``(d_out, d_in')``.
        num_gradients: ``m``, the total number of gradients that will be fed.
        damping: λ > 0.
        block_size: ``B`` (oBERT's default 50).
        dtype: Dtype of the inverse blocks.
        device: Their device.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        num_gradients: int,
        damping: float,
        block_size: int = 50,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.blocked = BlockLayout(shape, block_size)
        self.m = check_positive_int("num_gradients", num_gradients)
        self.damping = check_positive("damping", damping)
        eye = torch.eye(block_size, dtype=dtype, device=device) / self.damping
        self.inverse = eye.repeat(self.blocked.num_blocks, 1, 1)  # [nb, B, B]
        self.seen = 0

    @classmethod
    @torch.no_grad()
    def from_block_fisher(
        cls, shape: tuple[int, int], fisher: Tensor, *, num_gradients: int, damping: float
    ) -> BlockWoodburyInverse:
        """The same inverse from the block Fisher ``F_j = (1/m) Σ_i g_i g_iᵀ``, block by block.

        ``(λI + F_j)⁻¹`` for every block: what :meth:`update` reaches after all ``m`` gradients
        (up to rounding), with ``m`` and λ needed only now, so ``F`` can be gathered batch by
        batch first. Each block is factorised in float64 (Cholesky, or an eigenvalue floor where
        rounding made it indefinite, counted as a fallback) and the inverse written over
        ``fisher``.

        Args:
            shape: Canonical shape ``(d_out, d_in')``.
            fisher: ``[⌈d_out·d_in'/B⌉, B, B]``, symmetric positive semi-definite; overwritten.
            num_gradients: ``m``, the number of gradients behind ``fisher``.
            damping: λ > 0.

        Returns:
            The estimate, holding ``fisher``'s memory as its inverse blocks.

        Raises:
            ValueError: If ``fisher`` does not have the blocks of ``shape``.
        """
        B = int(fisher.shape[-1])
        blocked = BlockLayout(shape, B)
        if tuple(fisher.shape) != (blocked.num_blocks, B, B):
            raise ValueError(
                f"`fisher` has shape {tuple(fisher.shape)}, expected {(blocked.num_blocks, B, B)} "
                f"for shape {tuple(shape)}."
            )
        m = check_positive_int("num_gradients", num_gradients)
        lam = check_positive("damping", damping)

        def invert(blocks: Tensor) -> Tensor:
            return damped_inverse(blocks, lam).to(blocks.dtype)

        estimate = cls.__new__(cls)
        estimate.blocked, estimate.m, estimate.damping, estimate.seen = blocked, m, lam, m
        estimate.inverse = batched(invert, fisher, chunk=chunk_for_side(B), out=fisher)
        return estimate

    @torch.no_grad()
    def update(self, grads: Tensor) -> None:
        """Fold ``k`` gradients into the inverse (rank-``k`` Woodbury update per block).

        Args:
            grads: ``[k, d_out, d_in']``.

        Raises:
            RuntimeError: If more than ``num_gradients`` gradients are fed.
        """
        k = grads.shape[0]
        if self.seen + k > self.m:
            raise RuntimeError(f"More than num_gradients={self.m} gradients were fed.")
        G = self.blocked.to_blocks(grads.to(self.inverse.dtype))  # [nb, k, B]
        A = torch.bmm(G, self.inverse)  # rows (F⁻¹ g)ᵀ
        S = torch.bmm(A, G.transpose(1, 2))  # G F⁻¹ Gᵀ, [nb, k, k]
        S.diagonal(dim1=1, dim2=2).add_(float(self.m))
        # S is positive definite; solved in the estimate's own dtype, as oBERT does, with an
        # eigenvalue-floor fallback should rounding make a system indefinite.
        solve = functools.partial(spd_solve, dtype=A.dtype)
        side = max(S.shape[-1], A.shape[-1])
        solved = batched(solve, S, A, chunk=chunk_for_side(side))  # [nb, k, B]
        self.inverse -= torch.bmm(A.transpose(1, 2), solved)
        self.seen += k

    def qv(self, V: Tensor) -> Tensor:
        """``F⁻¹ V`` block by block.

        Args:
            V: ``[..., d_out, d_in']``.

        Returns:
            Same shape.
        """
        x = self.blocked.to_blocks(V.to(self.inverse.dtype))
        return self.blocked.from_blocks(torch.bmm(x, self.inverse), V.shape[:-2])

    def diag_q(self) -> Tensor:
        """Diagonal of the block inverses.

        Returns:
            ``[d_out, d_in']``.
        """
        return self.blocked.diagonal(self.inverse)

    def block_matrices(self) -> tuple[Tensor, int]:
        """The explicit inverse blocks, for joint OBS inside blocks.

        Returns:
            ``([num_blocks, B, B], B)``.
        """
        return self.inverse, self.blocked.block_size

    def state_bytes(self) -> int:
        """Bytes held by the estimate.

        Returns:
            Memory of the inverse blocks.
        """
        return self.inverse.numel() * self.inverse.element_size()


class MFACInverse:
    """Static M-FAC: ``F⁻¹x = λ⁻¹(x − Gᵀ (mλI + G Gᵀ)⁻¹ G x)`` per block, matrix-free.

    Args:
        grads: All ``m`` gradients, ``[m, d_out, d_in']``.
        damping: λ > 0.
        block_size: Entries of ``vec(W)`` per block (M-FAC's default 2000).

    Raises:
        ValueError: If ``grads`` is empty.
    """

    def __init__(self, grads: Tensor, *, damping: float, block_size: int = 2000) -> None:
        if grads.dim() != 3 or grads.shape[0] == 0:
            raise ValueError(
                f"`grads` must be a non-empty [m, d_out, d_in'], got {tuple(grads.shape)}."
            )
        shape = (int(grads.shape[1]), int(grads.shape[2]))
        self.blocked = BlockLayout(shape, min(block_size, shape[0] * shape[1]))
        self.damping = check_positive("damping", damping)
        m = grads.shape[0]
        G = self.blocked.to_blocks(grads)  # [nb, m, B]
        K = torch.bmm(G, G.transpose(1, 2))
        K.diagonal(dim1=1, dim2=2).add_(m * self.damping)
        # W = L⁻¹ G for K = L Lᵀ, so that Gᵀ K⁻¹ G = Wᵀ W (L in float64, repaired by an
        # eigenvalue floor if rounding made K indefinite).
        chol = robust_cholesky(K).to(G.dtype)
        self.W: Tensor = torch.linalg.solve_triangular(chol, G, upper=False)

    def qv(self, V: Tensor) -> Tensor:
        """``F⁻¹ V``.

        Args:
            V: ``[..., d_out, d_in']``.

        Returns:
            Same shape.
        """
        x = self.blocked.to_blocks(V.to(self.W.dtype))  # [nb, M, B]
        proj = torch.bmm(x, self.W.transpose(1, 2))  # [nb, M, m]
        y = (x - torch.bmm(proj, self.W)) / self.damping
        return self.blocked.from_blocks(y, V.shape[:-2])

    def sub_blocks(self, index: Tensor) -> Tensor:
        """Entries ``F⁻¹[index[g, a], index[g, b]]`` for flat canonical positions ``index``.

        Within a block ``F⁻¹ = λ⁻¹ (I − Wᵀ W)``; entries of different blocks are zero.

        Args:
            index: ``[G, k]`` flat (row-major) positions.

        Returns:
            ``[G, k, k]``.
        """
        block, position = self.blocked.locate(index)
        columns = self.W[block, :, position]  # [G, k, m]
        values = -torch.matmul(columns, columns.transpose(-2, -1))
        values = values + (index.unsqueeze(-1) == index.unsqueeze(-2)).to(values.dtype)
        same = block.unsqueeze(-1) == block.unsqueeze(-2)
        return torch.where(same, values, torch.zeros_like(values)) / self.damping

    def diag_q(self) -> Tensor:
        """``diag(F⁻¹) = λ⁻¹ (1 − Σ_j W_j²)``.

        Returns:
            ``[d_out, d_in']``.
        """
        diag = (1.0 - self.W.square().sum(1)) / self.damping
        return self.blocked.from_matrix_blocks(diag)

    def state_bytes(self) -> int:
        """Bytes held by the estimate.

        Returns:
            Memory of the stored vectors.
        """
        return self.W.numel() * self.W.element_size()
