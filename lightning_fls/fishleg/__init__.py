"""FishLeg curvature blocks: learned, structured ``Q(λ) ≈ (F + γI)⁻¹``, one block per layer.

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

from lightning_fls.fishleg.attention import (
    AttentionOutputAdapter,
    MultiheadAttentionAdapter,
    explicit_attention_forward,
    transformer_blocks,
)
from lightning_fls.fishleg.base import CurvatureBlock, QOperator
from lightning_fls.fishleg.block_diagonal import BlockDiagonalBlock
from lightning_fls.fishleg.capture import GradientCapture
from lightning_fls.fishleg.diagonal import DiagonalBlock
from lightning_fls.fishleg.fisher import DenseGradients, ExampleGradients, OuterProductGradients
from lightning_fls.fishleg.kronecker import KroneckerBlock
from lightning_fls.fishleg.layers import (
    Conv2dAdapter,
    GenericAdapter,
    LayerAdapter,
    LinearAdapter,
    OuterProductAdapter,
)
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
from lightning_fls.fishleg.registry import (
    STRUCTURES,
    StructurePolicy,
    adapter_for,
    build_blocks,
    find_layers,
    register_block,
    registered_types,
    unregister_block,
)
from lightning_fls.fishleg.statistics import LayerStatistics, StatisticsAccumulator

__all__ = [
    "DEFAULT_RELATIVE_DAMPING",
    "STRUCTURES",
    "AttentionOutputAdapter",
    "AuxStepResult",
    "AuxiliaryOptimizer",
    "BernoulliLikelihood",
    "BlockDiagonalBlock",
    "CategoricalLikelihood",
    "Conv2dAdapter",
    "CurvatureBlock",
    "DenseGradients",
    "DiagonalBlock",
    "ExampleGradients",
    "FisherVectorProduct",
    "GaussianLikelihood",
    "GenericAdapter",
    "GradientCapture",
    "KroneckerBlock",
    "LayerAdapter",
    "LayerStatistics",
    "Likelihood",
    "LinearAdapter",
    "MultiheadAttentionAdapter",
    "OuterProductAdapter",
    "OuterProductGradients",
    "QOperator",
    "StatisticsAccumulator",
    "StructurePolicy",
    "adapter_for",
    "aux_gradients",
    "aux_loss",
    "build_blocks",
    "explicit_attention_forward",
    "find_layers",
    "get_likelihood",
    "register_block",
    "registered_types",
    "relative_damping",
    "transformer_blocks",
    "unregister_block",
]
