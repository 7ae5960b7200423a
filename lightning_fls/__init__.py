"""lightning_fls: FishLeg Surgeon (FLS) second-order pruning for PyTorch Lightning.

Public API (everything else may change):

* curvature blocks, one per layer, learning ``Q(λ) ≈ (F + γI)⁻¹``:
  :class:`KroneckerBlock`, :class:`BlockDiagonalBlock`, :class:`DiagonalBlock` (all
  :class:`CurvatureBlock`), chosen per layer by a :class:`StructurePolicy`, for every module type
  in the registry (:func:`register_block`);
* gradient capture and Fisher–vector products: :class:`GradientCapture`,
  :class:`ExampleGradients`, the likelihoods for the sampled (true) Fisher;
* the auxiliary fit: :class:`AuxiliaryOptimizer`, :func:`relative_damping`,
  :class:`StatisticsAccumulator` (statistics-based initialisation).
"""

from __future__ import annotations

from lightning_fls.fishleg import (
    DEFAULT_RELATIVE_DAMPING,
    STRUCTURES,
    AuxiliaryOptimizer,
    AuxStepResult,
    BernoulliLikelihood,
    BlockDiagonalBlock,
    CategoricalLikelihood,
    Conv2dAdapter,
    CurvatureBlock,
    DiagonalBlock,
    ExampleGradients,
    GaussianLikelihood,
    GenericAdapter,
    GradientCapture,
    KroneckerBlock,
    LayerAdapter,
    LayerStatistics,
    Likelihood,
    LinearAdapter,
    StatisticsAccumulator,
    StructurePolicy,
    build_blocks,
    find_layers,
    register_block,
    relative_damping,
    unregister_block,
)
from lightning_fls.oneshot import PruningReport, prune_one_shot

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_RELATIVE_DAMPING",
    "STRUCTURES",
    "AuxStepResult",
    "AuxiliaryOptimizer",
    "BernoulliLikelihood",
    "BlockDiagonalBlock",
    "CategoricalLikelihood",
    "Conv2dAdapter",
    "CurvatureBlock",
    "DiagonalBlock",
    "ExampleGradients",
    "GaussianLikelihood",
    "GenericAdapter",
    "GradientCapture",
    "KroneckerBlock",
    "LayerAdapter",
    "LayerStatistics",
    "Likelihood",
    "LinearAdapter",
    "PruningReport",
    "StatisticsAccumulator",
    "StructurePolicy",
    "__version__",
    "build_blocks",
    "find_layers",
    "prune_one_shot",
    "register_block",
    "relative_damping",
    "unregister_block",
]
