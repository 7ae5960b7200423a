"""lightning_fls: FishLeg Surgeon (FLS) second-order pruning for PyTorch Lightning.

Public API (everything else may change):

* curvature blocks, one per layer, learning ``Q(λ) ≈ (F + γI)⁻¹``:
  :class:`KroneckerBlock`, :class:`BlockDiagonalBlock`, :class:`DiagonalBlock` (all
  :class:`CurvatureBlock`), chosen per layer by a :class:`StructurePolicy`, for every module type
  in the layer registry (:func:`register_layer`; :func:`register_block` is its deprecated
  alias), and :func:`prunable_layers` to see what will be pruned;
* gradient capture and Fisher–vector products: :class:`GradientCapture`,
  :class:`ExampleGradients`, the likelihoods for the sampled (true) Fisher;
* pruning: :class:`FLSPruningCallback` (gradual, inside a Lightning ``Trainer``),
  :func:`prune_one_shot`, the methods (:class:`PruningMethod`, :func:`register_method`,
  :func:`method_names`; the built-in ones in :mod:`lightning_fls.methods`), the layers that
  will be pruned (:func:`prunable_layers`), the schedules (:class:`SparsitySchedule`), and
  sparse export (:func:`export_pruned`);
* N:M semi-structured sparsity: :class:`NMPattern` / :func:`parse_pattern`,
  :func:`follows_pattern`, and the conversion of 2:4 models to PyTorch's sparse kernels
  (:func:`to_semi_structured`, :func:`semi_structured_support`);
* structured pruning: the coupled groups of neurons, channels and heads (:func:`find_groups`,
  :class:`GroupFamily`, :class:`GroupMember`, rules per module type with
  :func:`register_group_rule`), masks removing whole units (:func:`structured_masks`), and
  :func:`compact`, which cuts all-zero units out of a copy of the model;
* the auxiliary fit: :class:`AuxiliaryOptimizer`, :func:`relative_damping`,
  :class:`StatisticsAccumulator` (statistics-based initialisation).
"""

from __future__ import annotations

from lightning_fls.callback import FLSPruningCallback
from lightning_fls.export import SparseSizeReport, export_pruned, load_pruned, sparse_size_report
from lightning_fls.fishleg import (
    DEFAULT_RELATIVE_DAMPING,
    STRUCTURES,
    AuxiliaryOptimizer,
    AuxStepResult,
    BernoulliLikelihood,
    BlockDiagonalBlock,
    CategoricalLikelihood,
    CurvatureBlock,
    DiagonalBlock,
    GaussianLikelihood,
    KroneckerBlock,
    LayerStatistics,
    Likelihood,
    StatisticsAccumulator,
    StructurePolicy,
    build_blocks,
    relative_damping,
)
from lightning_fls.layers import (
    Conv2dAdapter,
    ExampleGradients,
    GenericAdapter,
    GradientCapture,
    LayerAdapter,
    LinearAdapter,
    find_layers,
    prunable_layers,
    register_block,
    register_layer,
    unregister_block,
    unregister_layer,
)
from lightning_fls.methods import (
    PruningMethod,
    method_names,
    register_method,
    unregister_method,
)
from lightning_fls.oneshot import PruningReport, prune_one_shot
from lightning_fls.patterns import NMPattern, follows_pattern, parse_pattern
from lightning_fls.schedules import SparsitySchedule, cubic_sparsity, linear_sparsity
from lightning_fls.semi_structured import semi_structured_support, to_semi_structured
from lightning_fls.structured import (
    GroupFamily,
    GroupMember,
    compact,
    find_groups,
    register_group_rule,
    structured_masks,
)

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
    "FLSPruningCallback",
    "GaussianLikelihood",
    "GenericAdapter",
    "GradientCapture",
    "GroupFamily",
    "GroupMember",
    "KroneckerBlock",
    "LayerAdapter",
    "LayerStatistics",
    "Likelihood",
    "LinearAdapter",
    "NMPattern",
    "PruningMethod",
    "PruningReport",
    "SparseSizeReport",
    "SparsitySchedule",
    "StatisticsAccumulator",
    "StructurePolicy",
    "__version__",
    "build_blocks",
    "compact",
    "cubic_sparsity",
    "export_pruned",
    "find_groups",
    "find_layers",
    "follows_pattern",
    "linear_sparsity",
    "load_pruned",
    "method_names",
    "parse_pattern",
    "prunable_layers",
    "prune_one_shot",
    "register_block",
    "register_group_rule",
    "register_layer",
    "register_method",
    "relative_damping",
    "semi_structured_support",
    "sparse_size_report",
    "structured_masks",
    "to_semi_structured",
    "unregister_block",
    "unregister_layer",
    "unregister_method",
]
