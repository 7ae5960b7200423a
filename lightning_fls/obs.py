r"""Optimal Brain Surgeon saliencies and weight corrections from an inverse-curvature estimate.

Local model of the loss at a trained θ (gradient ≈ 0): ``ΔL(δ) ≈ ½ δᵀ F δ``, with
``Q ≈ F⁻¹`` (Hassibi & Stork 1992). Removing weight ``q`` alone costs

.. math::

    \rho_q = \frac{w_q^2}{2\,[Q]_{qq}}, \qquad \delta = -\frac{w_q}{[Q]_{qq}}\, Q e_q .

For a set ``P`` of weights pruned at once, the *sum of single updates* (oBERT's unstructured
update, one Q·V product per layer) is ``δ = −Q (w ⊙ 1_P ⊘ diag Q)``, after which the pruned
entries are set exactly to zero. Its predicted loss increase is ``Σ_{q∈P} ρ_q`` (exact when the
pruned weights do not interact through Q).

Everything works on a layer's canonical matrix ``[d_out, d_in']`` (see
:mod:`lightning_fls.fishleg`); the bias column is never pruned but does receive corrections.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_fls._linalg import (
    batched,
    chunk_for_side,
    damped_inverse,
    robust_cholesky,
    spd_solve,
    sub_problems,
)
from lightning_fls.block_layout import BlockLayout
from lightning_fls.sparsegpt import obs_sweep


@runtime_checkable
class InverseCurvature(Protocol):
    """Anything with a Q·V product and diag(Q) on canonical matrices, Q ≈ (F + γI)⁻¹."""

    def qv(self, V: Tensor) -> Tensor:
        """``Q·V`` for ``V`` of shape ``[..., d_out, d_in']``."""
        ...

    def diag_q(self) -> Tensor:
        """``diag(Q)`` of shape ``[d_out, d_in']``."""
        ...


def obs_saliency(weight: Tensor, diag_q: Tensor) -> Tensor:
    """OBS saliency ``ρ = w² / (2 [Q]_qq)``, the predicted loss increase of removing each weight.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        diag_q: ``diag(Q)`` of the same shape (positive).

    Returns:
        ``ρ`` of the same shape, in float64 (the engine ranks it in float32, the width of one
        order key per weight of the model).
    """
    q = diag_q.to(torch.float64).clamp_min(torch.finfo(torch.float64).tiny)
    return weight.to(torch.float64).square() / (2.0 * q)


@dataclass(frozen=True)
class ObsUpdate:
    """The result of one OBS step on a layer.

    Attributes:
        weight: New canonical weights, pruned entries exactly zero.
        predicted_increase: ``Σ ρ`` over the newly pruned weights.
    """

    weight: Tensor
    predicted_increase: float


@torch.no_grad()
def obs_update(
    weight: Tensor,
    curvature: InverseCurvature,
    prune: Tensor,
    keep: Tensor,
    *,
    correct: bool = True,
) -> ObsUpdate:
    """Sum-of-singles OBS update: ``w ← w − Q (w ⊙ 1_P ⊘ diag Q)``, restricted, then hard zeros.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        curvature: The layer's ``Q``.
        prune: Boolean ``[d_out, d_in']``, the weights pruned *now*.
        keep: Boolean ``[d_out, d_in']``, the weights that survive this step (the correction is
            applied to these only; everything else ends exactly at zero).
        correct: Apply the correction (False: only zero the pruned weights, i.e. magnitude-style).

    Returns:
        The new weights and the predicted loss increase.
    """
    diag = curvature.diag_q().to(weight.dtype)
    saliency = obs_saliency(weight, diag)
    predicted = float(saliency[prune].sum())
    new = weight.clone()
    if correct and bool(prune.any()):
        scaled = torch.where(prune, weight / diag.clamp_min(torch.finfo(diag.dtype).tiny), 0.0)
        delta = curvature.qv(scaled).to(weight.dtype)
        new = new - delta * keep
    new = new * keep
    return ObsUpdate(weight=new, predicted_increase=predicted)


@runtime_checkable
class BlockCurvature(InverseCurvature, Protocol):
    """An inverse curvature that is block-diagonal over ``vec`` of the canonical matrix."""

    def block_matrices(self) -> tuple[Tensor, int]:
        """The diagonal blocks ``[m, B, B]`` of Q over the zero-padded ``vec`` and ``B``."""
        ...


@runtime_checkable
class FactoredBlockCurvature(BlockCurvature, Protocol):
    """A block-diagonal inverse curvature that may hold its blocks as factors ``Q_j = c·L_j L_jᵀ``.

    The joint OBS update then forms only the columns ``Q_j[:, P]`` of the weights pruned now,
    from the factor's rows, instead of reading a whole ``[m, B, B]`` copy of Q first.
    """

    def block_factors(self) -> tuple[Tensor, float, int] | None:
        """``(L [m, B, B], c, B)`` with ``Q_j = c·L_j L_jᵀ``; None where Q is not held so."""
        ...


@runtime_checkable
class KroneckerCurvature(InverseCurvature, Protocol):
    """An inverse curvature that may be a Kronecker product over the canonical matrix."""

    def kronecker_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(G_o [d_out, d_out], G_i [d_in', d_in'], c)`` with ``Q = c · G_o ⊗ G_i``.

        In the row-major ``vec`` convention, i.e. ``Q·V = c · G_o V G_i``; None where Q is
        not a pure product.
        """
        ...


@runtime_checkable
class CachingCurvature(InverseCurvature, Protocol):
    """An inverse curvature that keeps derived matrices between calls (Gram matrices, …)."""

    def release_cache(self) -> None:
        """Free what it keeps; the next call that needs it forms it again."""
        ...


@runtime_checkable
class SubBlockCurvature(InverseCurvature, Protocol):
    """An inverse curvature that reads its own sub-matrices ``Q[index[g], index[g]]``."""

    def sub_blocks(self, index: Tensor) -> Tensor:
        """``Q[index[g, a], index[g, b]]`` for flat canonical positions ``index`` ``[G, k]``."""
        ...


def _masked_solve(Q: Tensor, subset: Tensor, rhs: Tensor) -> Tensor:
    """``x`` with ``x_S = (Q_SS)⁻¹ rhs_S`` and 0 outside ``S``, for batched ``[B, k, k]``."""
    system = Q * subset.unsqueeze(-1) * subset.unsqueeze(-2)
    system.diagonal(dim1=-2, dim2=-1).add_(1.0 - subset)  # identity outside S
    return spd_solve(system, rhs)


def _solve_on_subset(Q: Tensor, w: Tensor, subset: Tensor) -> tuple[Tensor, Tensor]:
    """``(w ⊙ 1_S, (Q_SS)⁻¹ w_S)`` for a batch of sub-problems, as ``[B, k, 1]`` columns.

    Solved in float64 as ``(S Q S + (I − S)) x = S w``, in chunks across the CPU cores: ``Q_SS``
    is as ill-conditioned as the Fisher it inverts, and in float32 a condition number of
    ``10⁶`` already costs every digit of ``x`` (the correction ``δ = −Q E_S x``).

    Args:
        Q: ``[B, k, k]``.
        w: ``[B, k]``.
        subset: ``[B, k]``, boolean or 0/1.

    Returns:
        The right-hand side and the solution (zero outside ``S``), float64.
    """
    Q = Q.to(torch.float64)
    s = subset.to(Q.dtype)
    rhs = (w.to(Q.dtype) * s).unsqueeze(-1)
    return rhs, batched(_masked_solve, Q, s, rhs, chunk=chunk_for_side(Q.shape[-1]))


@torch.no_grad()
def joint_block_obs_update(
    weight: Tensor, curvature: BlockCurvature, prune: Tensor, keep: Tensor
) -> ObsUpdate:
    """Joint OBS inside each diagonal block of Q: the exact optimum of the local model.

    Within block ``b`` with pruned set ``P_b``: ``δ_b = −Q_b E_P (Q_b[P,P])⁻¹ w_P`` and the
    predicted increase ``½ w_Pᵀ (Q_b[P,P])⁻¹ w_P`` (Hassibi & Stork's group formula). Blocks do
    not interact, so this is exact for a block-diagonal Q. Solved for all blocks at once as
    ``(P Q_b P + (I − P)) x = P w`` on the smallest side that holds ``P_b``
    (:func:`~lightning_fls._linalg.sub_problems`; ``Q_b[:, P]`` formed from the factor where Q
    keeps one), then ``δ_b = Q_b[:, P] x``.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        curvature: Block-diagonal Q with :meth:`BlockCurvature.block_matrices`.
        prune: Boolean ``[d_out, d_in']``, the weights pruned now.
        keep: Boolean ``[d_out, d_in']``, the weights surviving this step.

    Returns:
        The new weights (pruned entries exactly zero) and the predicted loss increase.
    """
    factored = curvature.block_factors() if isinstance(curvature, FactoredBlockCurvature) else None
    if factored is not None:
        stored, scale, size = factored

        def columns(blocks: Tensor, index: Tensor) -> Tensor:
            rows = blocks.gather(1, index.unsqueeze(-1).expand(-1, -1, size))  # L[P, :]
            return (scale * torch.bmm(blocks, rows.transpose(1, 2))).to(torch.float64)

    else:
        stored, size = curvature.block_matrices()

        def columns(blocks: Tensor, index: Tensor) -> Tensor:
            return blocks.gather(2, index.unsqueeze(1).expand(-1, size, -1)).to(torch.float64)

    layout = BlockLayout((weight.shape[0], weight.shape[1]), size)
    w = layout.matrix_blocks(weight.to(torch.float64))
    p = layout.matrix_blocks(prune)
    active = p.any(1).nonzero().squeeze(1)  # only blocks that lose a weight move

    def update(blocks_at: Tensor, index: Tensor, subset: Tensor, w_rows: Tensor) -> Tensor:
        # Per chunk of blocks: [δ_b | w_Pᵀ (Q_b[P,P])⁻¹ w_P], in float64, on side s = index's.
        Q_cols = columns(stored[blocks_at], index)  # Q[:, idx]  [k, B, s]
        Q_sub = Q_cols.gather(1, index.unsqueeze(-1).expand(-1, -1, index.shape[1]))
        rhs = (w_rows.gather(1, index) * subset).unsqueeze(-1)
        x = _masked_solve(Q_sub, subset, rhs)
        return torch.cat([torch.bmm(Q_cols, x).squeeze(-1), (rhs * x).sum((1, 2)).unsqueeze(1)], 1)

    delta = torch.zeros_like(w)
    predicted = 0.0
    for which, index in sub_problems(p[active]):  # the weights pruned now first
        blocks_at = active[which]
        subset = p[blocks_at].gather(1, index).to(torch.float64)
        solved = batched(update, blocks_at, index, subset, w[blocks_at], chunk=chunk_for_side(size))
        predicted += float(0.5 * solved[:, size].sum())
        delta.index_copy_(0, blocks_at, solved[:, :size])
    delta_weight = layout.from_matrix_blocks(delta)
    new = (weight - delta_weight.to(weight.dtype)) * keep
    return ObsUpdate(weight=new, predicted_increase=predicted)


@torch.no_grad()
def joint_kronecker_obs_update(
    weight: Tensor, factors: tuple[Tensor, Tensor, float], keep: Tensor
) -> ObsUpdate | None:
    """Joint OBS for ``Q = c · G_o ⊗ G_i`` when the removed weights are whole rows or columns.

    With ``S`` every entry not kept (earlier removals included, so they stay zero exactly):

    * whole rows ``R``: ``[Q]_SS = c · G_o[R,R] ⊗ G_i`` and Hassibi & Stork's group update
      ``δw = −Q[:,S] ([Q]_SS)⁻¹ w_S`` reduces to ``δW = −G_o[:,R] G_o[R,R]⁻¹ W_R``, with the
      predicted increase ``(1/2c) tr(W_Rᵀ G_o[R,R]⁻¹ W_R G_i⁻¹)``;
    * whole columns ``C``: ``δW = −W_C G_i[C,C]⁻¹ G_i[C,:]`` and
      ``(1/2c) tr(W_Cᵀ G_o⁻¹ W_C G_i[C,C]⁻¹)``.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        factors: ``(G_o [d_out, d_out], G_i [d_in', d_in'], c)``
            (:meth:`KroneckerCurvature.kronecker_factors`).
        keep: Boolean ``[d_out, d_in']``, the weights surviving this step.

    Returns:
        The new weights (every entry not kept exactly zero) and the predicted loss increase;
        None when the entries not kept are neither whole rows nor whole columns (nor empty).
    """
    removed = ~keep.bool()
    if not bool(removed.any()):
        return None
    out_gram, in_gram, scale = factors
    rows, columns = removed.all(1), removed.all(0)
    W = weight.to(torch.float64)
    G_o, G_i = out_gram.to(W), in_gram.to(W)
    if bool((removed == rows.unsqueeze(1)).all()):
        R = rows.nonzero().squeeze(1)
        W_R = W[R]
        X = spd_solve(G_o[R][:, R], W_R)  # G_o[R,R]⁻¹ W_R
        delta = G_o[:, R] @ X
        predicted = 0.5 / scale * float((X * spd_solve(G_i, W_R.T).T).sum())
    elif bool((removed == columns.unsqueeze(0)).all()):
        C = columns.nonzero().squeeze(1)
        W_C = W[:, C]
        Y = spd_solve(G_i[C][:, C], W_C.T).T  # W_C G_i[C,C]⁻¹
        delta = Y @ G_i[C, :]
        predicted = 0.5 / scale * float((Y * spd_solve(G_o, W_C)).sum())
    else:
        return None
    new = (W - delta).to(weight.dtype) * keep
    return ObsUpdate(weight=new, predicted_increase=predicted)


ROW_CHUNK_ELEMENTS = 2**20
"""Most entries of the per-row systems gathered at once by :func:`kronecker_row_obs_update`
(8 MB in float64; a wider row's system is gathered alone). With 2²³ a chunk and its factor
held 130 MB beyond a small encoder's other memory (194 MB in use at the peak against 66 MB
with 2²⁰, a 1.6 M-weight BERT), and the solves took 13–23% longer (the autoencoder's captured
row updates; 384 × 1537 and 3072 × 769 rows at 50%), the chunk no longer fitting in cache."""


@torch.no_grad()
def kronecker_row_obs_update(
    weight: Tensor, factors: tuple[Tensor, Tensor, float], keep: Tensor
) -> ObsUpdate | None:
    r"""Joint OBS inside each row for ``Q = c · G_o ⊗ G_i``, the rows taken as decoupled.

    With ``G_o`` replaced by its diagonal, ``Q`` is block-diagonal over the rows, row ``r``'s
    block being ``c·(G_o)_rr·G_i``, and Hassibi & Stork's joint update is exact inside each row.
    With ``S`` the row's entries not kept (earlier removals included, so they stay zero exactly)
    and ``R`` the kept ones:

    .. math::

        δw_r = -G_i[:,S]\,(G_i[S,S])^{-1} w_S, \qquad
        Δ\mathcal L_r = \frac{w_S^\top (G_i[S,S])^{-1} w_S}{2\,c\,(G_o)_{rr}} .

    Where ``|R| < |S|`` the same update is solved on ``R`` with ``H = G_i⁻¹`` (the damped
    input covariance, up to scale): ``δw_R = H_RR⁻¹ H_RS w_S`` and
    ``w_Sᵀ (G_i[S,S])⁻¹ w_S = w_Sᵀ H_SS w_S − (H_RS w_S)ᵀ H_RR⁻¹ H_RS w_S`` (Schur complement).
    Each row costs one factorisation of side ``min(|S|, |R|)``, in float64 with the counted
    eigenvalue fallback of :func:`~lightning_fls._linalg.spd_solve`; rows are taken in chunks of
    equal side after sorting by it. This is the layer-wise reconstruction SparseGPT
    approximates column by column, solved jointly: the correction reaches the whole row, where
    the sum of group updates (:func:`group_obs_update`) ignores how groups interact.

    Arguments and result as :func:`joint_kronecker_obs_update`'s, with any pattern of removed
    entries; None only when every weight is kept.
    """
    removed = ~keep.bool()
    if not bool(removed.any()):
        return None
    out_gram, in_gram, scale = factors
    W = weight.to(torch.float64)
    G_i = in_gram.to(W.device)
    row_scale = scale * out_gram.diagonal().to(W)
    width = W.shape[1]
    counts = removed.sum(1)
    new = W * keep
    predicted = W.new_zeros(())
    on_removed = (counts > 0) & (2 * counts <= width)
    on_kept = 2 * counts > width
    # One helper per side, so that each side's float64 temporaries are freed before the other's.
    if bool(on_removed.any()):
        predicted += _solve_rows_on_removed(W, G_i, removed, on_removed, row_scale, new)
    if bool(on_kept.any()):
        predicted += _solve_rows_on_kept(W, G_i, removed, on_kept, row_scale, new)
    return ObsUpdate(weight=new.to(weight.dtype), predicted_increase=float(predicted))


def _solve_rows_on_removed(
    W: Tensor, G_i: Tensor, removed: Tensor, rows_in: Tensor, row_scale: Tensor, new: Tensor
) -> Tensor:
    """:func:`kronecker_row_obs_update` on the rows ``rows_in`` by systems on the removed set.

    Writes the updated rows (float64) into ``new`` and returns their predicted increase.
    """
    keep = ~removed
    G_wide = G_i.to(W)  # exact: the systems are gathered in float64 once, not cast per chunk
    predicted = W.new_zeros(())
    for rows, idx, valid in _row_chunks(removed, rows_in):
        A = _gathered_systems(G_wide, idx, valid)
        w_S = W[rows.unsqueeze(1), idx] * valid
        x = spd_solve(A, w_S.unsqueeze(-1)).squeeze(-1)
        del A
        z = torch.zeros(rows.numel(), W.shape[1], dtype=W.dtype, device=W.device)
        z.scatter_(1, idx, x * valid)
        new[rows] = (W[rows] - z @ G_wide) * keep[rows]
        predicted += (0.5 * (w_S * x).sum(1) / row_scale[rows]).sum()
    return predicted


def _solve_rows_on_kept(
    W: Tensor, G_i: Tensor, removed: Tensor, rows_in: Tensor, row_scale: Tensor, new: Tensor
) -> Tensor:
    """:func:`kronecker_row_obs_update` on the rows ``rows_in`` by systems on the kept set.

    Adds the rows' corrections (float64) to ``new`` and returns their predicted increase.
    """
    H = damped_inverse(G_i, 0.0)  # float64; Cholesky and its inverse, not d solves
    predicted = W.new_zeros(())
    for rows, idx, valid in _row_chunks(~removed, rows_in):
        w_S = W[rows] * removed[rows]
        u = w_S @ H  # u_R = H_RS w_S; w_Sᵀ u_S = w_Sᵀ H_SS w_S
        b = u.gather(1, idx) * valid
        if idx.shape[1]:
            A = _gathered_systems(H, idx, valid)  # float64, as spd_solve factorises
            x = spd_solve(A, b.unsqueeze(-1)).squeeze(-1) * valid
            del A
        else:
            x = b
        new[rows] += torch.zeros_like(w_S).scatter_(1, idx, x)  # on kept entries only
        quadratic = (w_S * u).sum(1) - (b * x).sum(1)
        predicted += (0.5 * quadratic / row_scale[rows]).sum()
    return predicted


SWEEP_REFINE_STEPS = 10
"""Conjugate-gradient steps of ``row_update="refined_sweep"`` from the sweep towards the joint
optimum (:func:`kronecker_sweep_obs_update`)."""
SWEEP_BLOCK_SIZE = 32
"""Columns per lazy-update block of :func:`kronecker_sweep_obs_update`'s sweep (the same result
up to rounding for any size). On 2 CPU cores the autoencoder's captured row updates swept 1.3×
faster with 32 than with SparseGPT's 128 (and 1.2× slower with 16): the per-column updates
inside a block are vector operations, which 32 columns keep short, while the updates between
blocks stay matrix products."""


@torch.no_grad()
def kronecker_sweep_obs_update(
    weight: Tensor,
    factors: tuple[Tensor, Tensor, float],
    keep: Tensor,
    *,
    refine_steps: int = 0,
) -> ObsUpdate | None:
    r"""SparseGPT's column sweep for ``Q = c · G_o ⊗ G_i``, the rows taken as decoupled.

    The same local model as :func:`kronecker_row_obs_update` (row ``r`` costs
    ``δw_rᵀ H δw_r / (2c(G_o)_rr)`` with ``H = G_i⁻¹``), minimised column by column instead of
    jointly: with ``G_i = Uᵀ U`` (``U`` upper triangular), column ``j`` is reached with the
    columns before it frozen, and each entry of it not kept is zeroed by the OBS step on the
    columns ``≥ j`` (Frantar & Alistarh, 2023; :func:`~lightning_fls.sparsegpt.obs_sweep`):

    .. math::

        e = w_j / U_{jj}, \qquad w_k \leftarrow w_k - e\,U_{jk} \ (k > j), \qquad
        Δ\mathcal L_r \mathrel{+}= \frac{e^2}{2\,c\,(G_o)_{rr}} .

    Entries removed earlier (zero, but moved by the corrections of columns to their left) are
    zeroed the same way, so they end exactly zero. That update is the joint one's where no
    kept entry lies left of a removed one, and elsewhere costs more (1.1-3.6x the joint
    update's loss increase on the autoencoder's layers, 2.6x summed over a gradual run),
    because a correction never reaches a column to the left. ``refine_steps`` steps of
    conjugate gradients on each row's kept entries then move it towards the joint optimum:
    ``min_x (x − w)ᵀ H (x − w)`` with ``x_S = 0``, started at the sweep, Jacobi-preconditioned
    (``diag H``), every row at once as one ``[d_out, d_in'] × [d_in', d_in']`` product a step,
    in float32 (exact arithmetic reaches the optimum in ``|R|`` steps; 10 brought the summed
    increase to 1.02x the joint one's there). The predicted increase is the exact
    ``Σ_r δw_rᵀ H δw_r / (2c(G_o)_rr)`` of the update made either way.

    The cost is one Cholesky factorisation of side ``d_in'`` and ``O(d_out · d_in'²)`` matrix
    products per layer (a further ``2 d_out · d_in'²`` flops a refinement step), against
    ``d_out`` factorisations of side up to ``d_in'/2`` for the joint update: 3.4 s instead
    of 26 s over the autoencoder's gradual run, without refinement.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        factors: ``(G_o, G_i, c)`` (:meth:`KroneckerCurvature.kronecker_factors`).
        keep: Boolean ``[d_out, d_in']``, the weights surviving this step.
        refine_steps: Conjugate-gradient steps after the sweep (>= 0).

    Returns:
        As :func:`kronecker_row_obs_update`: None only when every weight is kept.
    """
    removed = ~keep.bool()
    if not bool(removed.any()):
        return None
    out_gram, in_gram, scale = factors
    W = weight.to(torch.float64)
    # Rows scaled by 1/√(c (G_o)_rr): the sweep's Σ e² is then the predicted increase.
    row_root = (scale * out_gram.diagonal().to(W)).sqrt().unsqueeze(1)
    factor = robust_cholesky(in_gram.to(W), upper=True)
    swept, error = obs_sweep(W / row_root, factor, removed, block_size=SWEEP_BLOCK_SIZE)
    new = swept * row_root * keep
    del swept
    if refine_steps > 0:
        # H = G_i⁻¹ in place of the factor, which the sweep was the last to read: one float64
        # d_in'² matrix fewer at this layer's peak (72 MB for BERT-base's down-projections).
        metric = torch.cholesky_inverse(factor, upper=True, out=factor)
        new = _conjugate_gradient_rows(W, new, metric, keep, refine_steps)
        delta = (new - W) / row_root
        error = 0.5 * float(((delta @ metric) * delta).sum())
    return ObsUpdate(weight=new.to(weight.dtype), predicted_increase=error)


AUTO_JOINT_COST_RATIO = 4.0
"""``row_update="auto"`` solves a layer's rows exactly while that costs at most this many times
the refined sweep's arithmetic (:func:`row_update_flops`), and by the refined sweep beyond.

The ratio grows with the row width at a given sparsity. The pretrained MiniLM's layers (rows of
385 and 1537 inputs) stay at or below 2.9 at 50% and 2:4, so they keep the exact solve, as
measured; a BERT-base down-projection (rows of 3073) is at 5.7 at 50%, where the exact solve
took 46 s a layer and the refined sweep 3.4 s for a loss increase 0.9% higher (random
initialisation, random tokens)."""


def row_update_flops(keep: Tensor, refine_steps: int = SWEEP_REFINE_STEPS) -> tuple[float, float]:
    """Leading floating-point operation counts of the two row updates of a layer.

    The exact update factorises a system of side ``m_r = min(|S_r|, |R_r|)`` per row
    (``Σ_r m_r³/3``); the refined sweep one of side ``d_in'`` and then ``2·d_out·d_in'²`` per
    pass over the weights: the sweep and each conjugate-gradient step
    (``d_in'³/3 + (1 + 2·refine_steps)·d_out·d_in'²``, counting multiply-adds as one).

    Args:
        keep: Boolean ``[d_out, d_in']``, the weights surviving the step.
        refine_steps: The refined sweep's conjugate-gradient steps.

    Returns:
        ``(exact, refined sweep)``.
    """
    d_out, width = keep.shape
    kept = keep.sum(1).to(torch.float64)
    side = torch.minimum(kept, width - kept)
    exact = float(side.pow(3).sum()) / 3
    sweep = width**3 / 3 + (1 + 2 * refine_steps) * d_out * width**2
    return exact, float(sweep)


def kronecker_auto_obs_update(
    weight: Tensor, factors: tuple[Tensor, Tensor, float], keep: Tensor
) -> ObsUpdate | None:
    """The exact row update where it is affordable, else the refined sweep.

    That is :func:`kronecker_row_obs_update`, or :func:`kronecker_sweep_obs_update` with
    :data:`SWEEP_REFINE_STEPS`. Affordable: at most :data:`AUTO_JOINT_COST_RATIO` times the
    refined sweep's arithmetic (:func:`row_update_flops`), which leaves rows up to a couple of
    thousand inputs wide at moderate sparsity to the exact solve. Arguments and result as
    :func:`kronecker_row_obs_update`'s.
    """
    exact, sweep = row_update_flops(keep)
    if exact <= AUTO_JOINT_COST_RATIO * sweep:
        return kronecker_row_obs_update(weight, factors, keep)
    return kronecker_sweep_obs_update(weight, factors, keep, refine_steps=SWEEP_REFINE_STEPS)


def _conjugate_gradient_rows(
    weight: Tensor, start: Tensor, metric: Tensor, keep: Tensor, steps: int
) -> Tensor:
    """``steps`` of Jacobi-preconditioned CG on every row's ``min (x − w)ᵀ H (x − w)``, ``x_S = 0``.

    Args:
        weight: The weights ``w`` before the update, ``[d_out, n]``.
        start: A feasible start (zero where not kept), ``[d_out, n]``.
        metric: ``H`` ``[n, n]``, symmetric positive definite.
        keep: Boolean ``[d_out, n]``: the free entries.
        steps: Iterations.

    Returns:
        float64 ``[d_out, n]``, still zero where not kept.
    """
    free = keep.to(torch.float32)
    H = metric.to(torch.float32)
    inverse_diagonal = free / H.diagonal()
    x = start.to(torch.float32)
    residual = -((x - weight.to(torch.float32)) @ H) * free  # minus the gradient, on R only
    direction = residual * inverse_diagonal
    rz = (residual * direction).sum(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(steps):
        image = (direction @ H) * free
        curvature = (direction * image).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), 0.0)
        x += alpha * direction
        residual -= alpha * image
        preconditioned = residual * inverse_diagonal
        rz_next = (residual * preconditioned).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), 0.0)
        direction = preconditioned + beta * direction
        rz = rz_next
    return x.to(torch.float64) * keep


def _row_chunks(chosen: Tensor, rows_in: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Rows of ``rows_in`` in chunks of about equal count, with each row's chosen columns.

    Yields ``(rows [r], idx [r, k], valid [r, k])``: ``idx`` lists each row's ``True`` columns
    of ``chosen`` first (ascending), padded to the chunk's largest count ``k`` with other
    columns, which ``valid`` marks ``False``.
    """
    counts = chosen.sum(1)
    rows = rows_in.nonzero().squeeze(1)
    rows = rows[torch.sort(counts[rows], descending=True, stable=True).indices]
    start = 0
    while start < rows.numel():
        k = int(counts[rows[start]])
        size = max(1, ROW_CHUNK_ELEMENTS // max(1, k * k))
        chunk = rows[start : start + size]
        order = torch.sort(chosen[chunk].to(torch.int8), dim=1, descending=True, stable=True)
        idx = order.indices[:, :k]
        valid = torch.arange(k, device=idx.device) < counts[chunk].unsqueeze(1)
        yield chunk, idx, valid
        start += size


def _gathered_systems(M: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
    """``M[idx_r, idx_r]`` for every row ``r``, ``[r, k, k]``, padding set to the identity."""
    A = M[idx.unsqueeze(-1), idx.unsqueeze(-2)]
    A.masked_fill_(~(valid.unsqueeze(-1) & valid.unsqueeze(-2)), 0.0)
    A.diagonal(dim1=-2, dim2=-1).add_((~valid).to(A.dtype))
    return A


# -- N:M groups -----------------------------------------------------------------------------

MAX_ENUMERATED_SUBSETS = 512
"""Beyond this many ``C(m, n)`` subsets per group, the choice inside a group is greedy."""


def group_index(canonical_shape: tuple[int, int], weight_columns: int, m: int) -> Tensor:
    """Flat canonical positions of every group of ``m`` consecutive weights in a row.

    Args:
        canonical_shape: ``(d_out, d_in')``.
        weight_columns: How many leading canonical columns are weights (the rest, a bias
            column, form no groups); a multiple of ``m``.
        m: Group size.

    Returns:
        ``int64`` ``[G, m]`` with ``G = d_out · weight_columns / m``, in row-major group order
        (the order of :func:`lightning_fls.patterns.pruned_per_group`).
    """
    rows, width = canonical_shape
    columns = torch.arange(weight_columns).reshape(-1, m)
    return (torch.arange(rows).reshape(-1, 1, 1) * width + columns).reshape(-1, m)


def q_sub_blocks(curvature: InverseCurvature, index: Tensor) -> Tensor:
    """The sub-matrices ``Q[index[g], index[g]]`` of an inverse-curvature estimate.

    Uses the estimate's own ``sub_blocks(index)`` when it has one, else its diagonal blocks
    (``block_matrices``), else ``diag(Q)`` alone (exact for diagonal estimates: magnitude,
    diagonal Fisher).

    Args:
        curvature: The estimate.
        index: Flat canonical positions ``[G, k]``.

    Returns:
        ``[G, k, k]``.
    """
    if isinstance(curvature, SubBlockCurvature):
        return curvature.sub_blocks(index)
    if isinstance(curvature, BlockCurvature):
        matrices, size = curvature.block_matrices()
        block, position = BlockLayout((1, matrices.shape[0] * size), size).locate(index)
        same = block.unsqueeze(-1) == block.unsqueeze(-2)
        values = matrices[block.unsqueeze(-1), position.unsqueeze(-1), position.unsqueeze(-2)]
        return torch.where(same, values, torch.zeros_like(values))
    diag = curvature.diag_q().reshape(-1)[index]
    return torch.diag_embed(diag)


def _subset_cost(w: Tensor, Q: Tensor, subset: Tensor) -> Tensor:
    """``½ w_Sᵀ (Q_SS)⁻¹ w_S`` for each group, ``subset`` a boolean ``[G, m]``."""
    rhs, x = _solve_on_subset(Q, w, subset)
    cost: Tensor = 0.5 * (rhs * x).sum((-2, -1))
    return cost


def choose_group_prunes(w: Tensor, pruned: Tensor, Q: Tensor, n: int) -> Tensor:
    """In each group, the ``n`` weights whose joint removal costs least under OBS.

    The cost of removing a set ``S`` from a group is Hassibi & Stork's group saliency
    ``½ w_Sᵀ (Q_SS)⁻¹ w_S``; ``S`` must contain the entries pruned already. Every subset of
    size ``n`` is tried when there are at most :data:`MAX_ENUMERATED_SUBSETS`, else weights are
    added one at a time, each the cheapest addition.

    Args:
        w: Weights ``[G, m]``.
        pruned: Boolean ``[G, m]``, entries pruned already (at most ``n`` per group; where
            more, they are kept as they are).
        Q: Sub-blocks ``[G, m, m]``.
        n: Entries to prune per group.

    Returns:
        Boolean ``[G, m]``: the pruned set of each group after this step.
    """
    m = w.shape[-1]
    w = w.to(Q.dtype)
    full = pruned.sum(-1) >= n
    if math.comb(m, n) <= MAX_ENUMERATED_SUBSETS:
        subsets = torch.zeros(math.comb(m, n), m, dtype=torch.bool, device=w.device)
        for row, members in enumerate(itertools.combinations(range(m), n)):
            subsets[row, list(members)] = True
        costs = []
        for subset in subsets:
            cost = _subset_cost(w, Q, subset.expand_as(pruned))
            feasible = (subset | ~pruned).all(-1)  # contains every pruned entry
            costs.append(torch.where(feasible, cost, torch.full_like(cost, math.inf)))
        best = subsets[torch.stack(costs, -1).argmin(-1)]
    else:
        best = pruned.clone()
        for _ in range(n):
            costs = []
            for j in range(m):
                trial = best.clone()
                trial[:, j] = True
                cost = _subset_cost(w, Q, trial)
                bad = best[:, j] | (best.sum(-1) >= n)
                costs.append(torch.where(bad, torch.full_like(cost, math.inf), cost))
            stacked = torch.stack(costs, -1)
            pick = stacked.argmin(-1)
            grow = torch.isfinite(stacked.min(-1).values)
            best[grow, pick[grow]] = True
    return torch.where(full.unsqueeze(-1), pruned, best)


@torch.no_grad()
def group_obs_update(
    weight: Tensor,
    curvature: InverseCurvature,
    index: Tensor,
    pruned: Tensor,
    keep: Tensor,
    sub_blocks: Tensor | None = None,
) -> ObsUpdate:
    """Joint OBS inside each group (the group form of OBS), summed over groups.

    For group ``g`` with pruned set ``P_g`` (entries pruned now and before, all held at zero):
    ``x_g = (Q_{P_g P_g})⁻¹ w_{P_g}``, and ``δ = −Q Σ_g E_{P_g} x_g`` (one Q·V product), with
    predicted increase ``Σ_g ½ w_{P_g}ᵀ x_g``. Exact when Q does not couple groups; oBERT's
    block-4 update.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        curvature: The layer's ``Q``.
        index: Flat canonical positions of the groups, ``[G, m]`` (:func:`group_index`).
        pruned: Boolean ``[G, m]``, each group's pruned entries after this step.
        keep: Boolean ``[d_out, d_in']``, the weights surviving this step.
        sub_blocks: ``Q[index, index]`` if already computed (:func:`q_sub_blocks`).

    Returns:
        The new weights (pruned entries exactly zero) and the predicted loss increase.
    """
    Q = q_sub_blocks(curvature, index) if sub_blocks is None else sub_blocks
    flat = weight.reshape(-1)
    rhs, x = _solve_on_subset(Q, flat[index], pruned)
    predicted = float(0.5 * (rhs * x).sum())
    V = torch.zeros(flat.numel(), dtype=Q.dtype, device=flat.device)
    V[index.reshape(-1)] = x.reshape(-1).to(V.dtype)
    delta = curvature.qv(V.reshape(weight.shape).to(weight.dtype)).to(weight.dtype)
    new = (weight - delta) * keep
    return ObsUpdate(weight=new, predicted_increase=predicted)
