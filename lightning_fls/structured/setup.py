"""Setting up structured pruning for a run: the checks of the options, and the units."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_fls._validation import check_choice
from lightning_fls.layers import LayerAdapter
from lightning_fls.methods.base import method_class, method_names
from lightning_fls.options import PruningOptions
from lightning_fls.structured.discovery import find_groups
from lightning_fls.structured.groups import GRANULARITIES
from lightning_fls.structured.masks import zero_units
from lightning_fls.structured.saliency import StructuredUnits, unit_layouts

UNSTRUCTURED = "unstructured"
"""The default granularity: single weights."""


def check_granularity(
    granularity: Any, options: PruningOptions, *, memory_budget_mb: float | None = None
) -> str:
    """``granularity``, checked by itself and against the run's options.

    Args:
        granularity: ``"unstructured"``, ``"neuron"``, ``"channel"`` or ``"head"``.
        options: The run's validated options.
        memory_budget_mb: The run's layer-group budget, if any.

    Returns:
        The granularity.

    Raises:
        ValueError: For an unknown granularity, or one that is not unstructured with a
            ``pattern``, a ``memory_budget_mb``, a method with a layer-wise step of its own,
            or a scope other than ``"global"``.
    """
    check_choice("granularity", granularity, (UNSTRUCTURED, *GRANULARITIES))
    if granularity == UNSTRUCTURED:
        return UNSTRUCTURED
    for name, value, reason in (
        ("pattern", options.pattern, "N:M patterns are unstructured"),
        ("memory_budget_mb", memory_budget_mb, "units are ranked over all layers at once"),
    ):
        if value is not None:
            raise ValueError(f"`{name}` does not apply with granularity={granularity!r}: {reason}.")
    if not options.method.removes_units:
        able = [name for name in method_names() if method_class(name).removes_units]
        raise ValueError(
            f"method={options.method_name!r} cannot remove whole units (granularity="
            f"{granularity!r}): it prunes by its own layer-wise step. Methods that can: {able}."
        )
    if options.scope != "global":
        raise ValueError(
            f"granularity={granularity!r} needs scope='global' (units are ranked over all "
            f"layers), got scope={options.scope!r}."
        )
    return str(granularity)


def structured_units(
    model: nn.Module,
    layers: Mapping[str, LayerAdapter],
    granularity: str,
    example_inputs: Any = None,
) -> StructuredUnits:
    """The families of ``granularity`` among the pruned layers; all-zero units count as removed.

    Args:
        model: The model.
        layers: The pruned layers, keyed by weight name.
        granularity: ``"neuron"``, ``"channel"`` or ``"head"``.
        example_inputs: The forward's positional input, for a traced model that flattens
            (:func:`~lightning_fls.find_groups`).

    Returns:
        The units.

    Raises:
        ValueError: If no family of ``granularity`` lies among the pruned layers.
    """
    families = find_groups(model, granularity, example_inputs)
    layouts, skipped = unit_layouts(model, layers, families)
    if not layouts:
        raise ValueError(
            f"granularity={granularity!r} found no {granularity}s to remove among the pruned "
            f"layers{': ' + str(skipped) if skipped else ''}."
        )
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return StructuredUnits(layouts, [zero_units(tensors, layout.family) for layout in layouts])
