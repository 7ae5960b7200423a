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

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lightning_fls._linalg import batched


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
        ``ρ`` of the same shape (float64 for exact ranking ties across layers).
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


class BlockCurvature(InverseCurvature, Protocol):
    """An inverse curvature that is block-diagonal over ``vec`` of the canonical matrix."""

    def block_matrices(self) -> tuple[Tensor, int]:
        """The diagonal blocks ``[m, B, B]`` of Q over the zero-padded ``vec`` and ``B``."""
        ...


@torch.no_grad()
def joint_block_obs_update(
    weight: Tensor, curvature: BlockCurvature, prune: Tensor, keep: Tensor
) -> ObsUpdate:
    """Joint OBS inside each diagonal block of Q: the exact optimum of the local model.

    Within block ``b`` with pruned set ``P_b``: ``δ_b = −Q_b E_P (Q_b[P,P])⁻¹ w_P`` and the
    predicted increase ``½ w_Pᵀ (Q_b[P,P])⁻¹ w_P`` (Hassibi & Stork's group formula). Blocks do
    not interact, so this is exact for a block-diagonal Q. Solved for all blocks at once as
    ``(P Q_b P + (I − P)) x = P w``.

    Args:
        weight: Canonical weights ``[d_out, d_in']``.
        curvature: Block-diagonal Q with :meth:`BlockCurvature.block_matrices`.
        prune: Boolean ``[d_out, d_in']``, the weights pruned now.
        keep: Boolean ``[d_out, d_in']``, the weights surviving this step.

    Returns:
        The new weights (pruned entries exactly zero) and the predicted loss increase.
    """
    blocks, size = curvature.block_matrices()
    num_blocks = blocks.shape[0]
    n = weight.numel()
    pad = num_blocks * size - n

    def to_blocks(t: Tensor) -> Tensor:
        flat = t.reshape(-1).to(blocks.dtype)
        return torch.nn.functional.pad(flat, (0, pad)).reshape(num_blocks, size)

    w, p = to_blocks(weight), to_blocks(prune)
    rhs = (w * p).unsqueeze(-1)

    def solve(Q: Tensor, p: Tensor, rhs: Tensor) -> Tensor:
        system = Q * p.unsqueeze(-1) * p.unsqueeze(-2)
        system.diagonal(dim1=1, dim2=2).add_(1.0 - p)  # identity outside P
        x: Tensor = torch.linalg.solve(system, rhs)  # zero outside P
        return x

    x = batched(solve, blocks, p, rhs)
    predicted = float(0.5 * (rhs * x).sum())
    delta = torch.bmm(blocks, x).reshape(-1)[:n].reshape(weight.shape)
    new = (weight - delta.to(weight.dtype)) * keep
    return ObsUpdate(weight=new, predicted_increase=predicted)
