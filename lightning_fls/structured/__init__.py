"""Structured pruning: coupled groups of units (neurons, channels, heads) and their removal.

* :func:`find_groups` finds the :class:`GroupFamily` of each layer whose units (Linear output
  neurons, Conv2d output channels, attention heads) can be removed together with the matching
  inputs of the layers reading them, by tracing the model with ``torch.fx`` or through the
  group rules registered per module type (:func:`register_group_rule`);
* :func:`structured_masks` turns "remove these units" into keep-masks per parameter;
* :func:`compact` returns a smaller copy of a model without the units whose weights are all
  zero, computing the same outputs.
"""

from __future__ import annotations

from lightning_fls.structured.attention import PrunedMultiheadAttention
from lightning_fls.structured.compact import compact
from lightning_fls.structured.discovery import find_groups
from lightning_fls.structured.groups import GRANULARITIES, ROLES, GroupFamily, GroupMember
from lightning_fls.structured.masks import structured_masks, zero_units
from lightning_fls.structured.rules import (
    GroupRule,
    bert_layer_rule,
    gpt2_block_rule,
    register_group_rule,
    transformer_block_rule,
    transformer_encoder_layer_rule,
    unregister_group_rule,
)

__all__ = [
    "GRANULARITIES",
    "ROLES",
    "GroupFamily",
    "GroupMember",
    "GroupRule",
    "PrunedMultiheadAttention",
    "bert_layer_rule",
    "compact",
    "find_groups",
    "gpt2_block_rule",
    "register_group_rule",
    "structured_masks",
    "transformer_block_rule",
    "transformer_encoder_layer_rule",
    "unregister_group_rule",
    "zero_units",
]
