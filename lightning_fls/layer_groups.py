"""Layer groups: curvature work for a large model in groups of layers that fit a memory budget.

A second-order method holds, for every layer, statistics as large as its estimate (block-diagonal
FishLeg: ``⌈n/B⌉·B²`` floats for ``n`` weights, B times the weights themselves). Built for every
layer at once they outgrow the model (2.1 GB for the 10.6 M weights of all-MiniLM-L6-v2, 17 GB for
BERT-base). In layer groups, :func:`~lightning_fls.prune_one_shot` keeps the global ranking and
holds one group's statistics at a time:

1. for each group in turn: stream its statistics over the step's calibration batches, factorise
   them into its estimates, keep one saliency per weight, free the estimates;
2. choose the masks from all saliencies at once (global threshold, caps, N:M);
3. for each group again (the last one is still held): rebuild its estimates from the same batches
   and sampled labels and compute its OBS corrections, written to the model only once every group
   is done, so every group's statistics see the same weights.

The result equals the one-group run (tested); the price is a second calibration pass per group but
the last. The damping γ comes from every layer's Fisher trace, summed in the first pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_fls._validation import check_positive

DEFAULT_BUDGET_FLOOR_MB = 512.0
"""Smallest default budget: below it, more groups cost more passes than the memory is worth."""


def default_budget_mb(layer_bytes: Mapping[str, int]) -> float:
    """Twice the largest layer's statistics, and at least :data:`DEFAULT_BUDGET_FLOOR_MB`.

    Args:
        layer_bytes: Each layer's statistics in bytes.

    Returns:
        The budget in MB.
    """
    largest = max(layer_bytes.values(), default=0)
    return max(2 * largest / 2**20, DEFAULT_BUDGET_FLOOR_MB)


def check_budget(memory_budget_mb: float | None) -> float | None:
    """Validate ``memory_budget_mb`` (None, or a positive number of MB).

    Raises:
        ValueError: If it is not None and not a positive finite number.
    """
    if memory_budget_mb is None:
        return None
    return check_positive("memory_budget_mb", memory_budget_mb)


def plan_groups(layer_bytes: Mapping[str, int], budget_mb: float) -> list[list[str]]:
    """Consecutive layers (in the mapping's order) in groups whose statistics fit the budget.

    Greedy: a group takes layers while their sum stays within the budget; a layer larger than
    the budget is a group of its own.

    Args:
        layer_bytes: Each layer's statistics in bytes, in model order.
        budget_mb: The budget in MB (> 0).

    Returns:
        The groups, every layer in exactly one, in order.
    """
    budget = budget_mb * 2**20
    groups: list[list[str]] = []
    used = 0.0
    for key, size in layer_bytes.items():
        if groups and used + size <= budget:
            groups[-1].append(key)
            used += size
        else:
            groups.append([key])
            used = size
    return groups
