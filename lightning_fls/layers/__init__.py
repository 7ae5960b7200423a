"""What every pruning method shares about layers: adapters, their registry, gradient capture.

* **Adapters** (:class:`LayerAdapter`): how a module's parameters form its canonical matrix
  ``[d_out, d_in']`` (the bias as the last column) and how its per-example gradients are
  rebuilt from captured inputs and output gradients: :class:`LinearAdapter`,
  :class:`Conv2dAdapter`, ``nn.MultiheadAttention``'s packed in-projection
  (:class:`MultiheadAttentionAdapter`), and :class:`GenericAdapter` for any other module with
  parameters (norms, embeddings) when named explicitly.
* **Registry**: :func:`register_layer` adds a module type; :func:`find_layers` applies the
  registry to a model; :func:`prunable_layers` is what the pruners prune (see it before pruning).
* **Capture** (:class:`GradientCapture`) records a step's inputs and output gradients;
  :class:`ExampleGradients` holds per-example gradients and their Fisher–vector products.
"""

from __future__ import annotations

from lightning_fls.layers.adapters import (
    Conv2dAdapter,
    GenericAdapter,
    LayerAdapter,
    LinearAdapter,
    OuterProductAdapter,
)
from lightning_fls.layers.attention import (
    AttentionOutputAdapter,
    MultiheadAttentionAdapter,
    explicit_attention_forward,
    transformer_blocks,
)
from lightning_fls.layers.capture import GradientCapture
from lightning_fls.layers.gradients import (
    DenseGradients,
    ExampleGradients,
    OuterProductGradients,
)
from lightning_fls.layers.registry import (
    adapter_for,
    find_layers,
    register_block,
    register_layer,
    registered_types,
    unregister_block,
    unregister_layer,
)
from lightning_fls.layers.selection import prunable_layers

__all__ = [
    "AttentionOutputAdapter",
    "Conv2dAdapter",
    "DenseGradients",
    "ExampleGradients",
    "GenericAdapter",
    "GradientCapture",
    "LayerAdapter",
    "LinearAdapter",
    "MultiheadAttentionAdapter",
    "OuterProductAdapter",
    "OuterProductGradients",
    "adapter_for",
    "explicit_attention_forward",
    "find_layers",
    "prunable_layers",
    "register_block",
    "register_layer",
    "registered_types",
    "transformer_blocks",
    "unregister_block",
    "unregister_layer",
]
