"""FishLeg curvature blocks: learned, structured ``Q(λ) ≈ (F + γI)⁻¹``, one block per layer.

This package holds the FishLeg parts only: the blocks, the auxiliary objective, the statistics
that start them, and the likelihoods of the sampled Fisher. What every method shares about
layers (adapters, their registry, gradient capture, per-example gradients) is
:mod:`lightning_fls.layers`.

Conventions used by every block, adapter and Fisher–vector product:

* **Canonical matrix.** A layer's parameters form one matrix ``M`` of shape ``[d_out, d_in']``:
  a Linear weight as it is, a Conv2d kernel flattened to ``[c_out, c_in/groups · kh · kw]``,
  ``nn.MultiheadAttention``'s packed ``in_proj_weight`` as the Linear map ``[3E, E]``,
  and the bias, if any, appended as the **last column** (``d_in' = d_in + 1``).
* **vec is row-major**: ``vec(M) = M.flatten()``, flat index ``i · d_in' + j``. Then
  ``vec(P M Rᵀ) = (P ⊗ R) vec(M)``, i.e. ``torch.kron(P, R)`` is the matrix of
  ``M ↦ P M Rᵀ``. Dense references in the tests are built from this identity.
* **Layer keys** are the fully-qualified name of the layer's weight (``"encoder.0.weight"``);
  the block also covers that layer's bias.
* A block's dtype is its own (float32 by default), whatever the model's precision.
"""

from __future__ import annotations

from lightning_fls.fishleg.base import CurvatureBlock, QOperator
from lightning_fls.fishleg.block_diagonal import BlockDiagonalBlock
from lightning_fls.fishleg.diagonal import DiagonalBlock
from lightning_fls.fishleg.kronecker import KroneckerBlock
from lightning_fls.fishleg.likelihoods import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    get_likelihood,
)
from lightning_fls.fishleg.objective import (
    DEFAULT_RELATIVE_DAMPING,
    AuxiliaryOptimizer,
    AuxStepResult,
    FisherVectorProduct,
    aux_gradients,
    aux_loss,
    relative_damping,
)
from lightning_fls.fishleg.registry import STRUCTURES, Structure, StructurePolicy, build_blocks
from lightning_fls.fishleg.statistics import LayerStatistics, StatisticsAccumulator

__all__ = [
    "DEFAULT_RELATIVE_DAMPING",
    "STRUCTURES",
    "AuxStepResult",
    "AuxiliaryOptimizer",
    "BernoulliLikelihood",
    "BlockDiagonalBlock",
    "CategoricalLikelihood",
    "CurvatureBlock",
    "DiagonalBlock",
    "FisherVectorProduct",
    "GaussianLikelihood",
    "KroneckerBlock",
    "LayerStatistics",
    "Likelihood",
    "QOperator",
    "StatisticsAccumulator",
    "Structure",
    "StructurePolicy",
    "aux_gradients",
    "aux_loss",
    "build_blocks",
    "get_likelihood",
    "relative_damping",
]
