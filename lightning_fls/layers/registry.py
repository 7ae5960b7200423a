"""The registry of layer types: which module classes can be pruned, through which adapter.

Linear, Conv2d and ``nn.MultiheadAttention`` are built in, and Hugging Face's GPT-2-style
``Conv1D`` once ``transformers`` is imported; :func:`register_layer` adds a type (its adapter
says how the parameters form the canonical matrix and how per-example gradients are rebuilt).
:func:`find_layers` applies the registry to a model.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from torch import nn

from lightning_fls.layers.adapters import (
    Conv2dAdapter,
    GenericAdapter,
    LayerAdapter,
    LinearAdapter,
    TransposedLinearAdapter,
)
from lightning_fls.layers.attention import (
    AttentionOutputAdapter,
    MultiheadAttentionAdapter,
    attention_parents,
)

_ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.MultiheadAttention: MultiheadAttentionAdapter,
}


_OPTIONAL_TYPES: dict[tuple[str, str], type[LayerAdapter]] = {
    ("transformers.pytorch_utils", "Conv1D"): TransposedLinearAdapter,
}
"""Layer types of optional libraries, registered once the library has been imported (so
``lightning_fls`` never imports it itself): ``(module, class name)`` to adapter."""


def _register_optional_types() -> None:
    for (module_name, class_name), adapter in list(_OPTIONAL_TYPES.items()):
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            _ADAPTERS.setdefault(cls, adapter)
            del _OPTIONAL_TYPES[(module_name, class_name)]


def register_layer(
    module_type: type[nn.Module], adapter: type[LayerAdapter], *, overwrite: bool = False
) -> None:
    """Register how a module type is pruned (and gets a curvature block).

    The adapter tells how the module's parameters form the canonical matrix and how its
    per-example gradients are rebuilt from captured inputs and output gradients; every block
    structure (:data:`STRUCTURES`) can then be built for it.

    Args:
        module_type: The ``nn.Module`` subclass (its subclasses are covered too).
        adapter: A :class:`~lightning_fls.layers.LayerAdapter` subclass for it.
        overwrite: Replace an existing registration instead of refusing.

    Raises:
        TypeError: If the arguments are not a module class and an adapter class.
        ValueError: If ``module_type`` is registered already and ``overwrite`` is false.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"`module_type` must be an nn.Module subclass, got {module_type!r}.")
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"`adapter` must be a LayerAdapter subclass, got {adapter!r}.")
    if module_type in _ADAPTERS and not overwrite:
        raise ValueError(
            f"{module_type.__name__} is registered already (to {_ADAPTERS[module_type].__name__}); "
            "pass overwrite=True to replace it."
        )
    _ADAPTERS[module_type] = adapter


def unregister_layer(module_type: type[nn.Module]) -> None:
    """Remove a registration (built-in ones included).

    Args:
        module_type: The module class.

    Raises:
        KeyError: If it is not registered.
    """
    if module_type not in _ADAPTERS:
        raise KeyError(f"{module_type.__name__} is not registered.")
    del _ADAPTERS[module_type]


def registered_types() -> tuple[type[nn.Module], ...]:
    """Module types that can be pruned (and get a curvature block).

    Returns:
        The registered module classes.
    """
    _register_optional_types()
    return tuple(_ADAPTERS)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a module, or None if its type is not registered.

    The most specific registered class in the module's MRO wins.

    Args:
        module: Any module.

    Returns:
        A new adapter wrapping ``module``, or None.
    """
    _register_optional_types()
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](module)
    return None


def register_block(
    module_type: type[nn.Module], adapter: type[LayerAdapter], *, overwrite: bool = False
) -> None:
    """Deprecated alias of :func:`register_layer` (it registers a layer adapter, not a block).

    Args:
        module_type: The ``nn.Module`` subclass.
        adapter: A :class:`~lightning_fls.layers.LayerAdapter` subclass for it.
        overwrite: Replace an existing registration instead of refusing.
    """
    warnings.warn(
        "register_block() is deprecated: it registers a layer adapter; use register_layer().",
        DeprecationWarning,
        stacklevel=2,
    )
    register_layer(module_type, adapter, overwrite=overwrite)


def unregister_block(module_type: type[nn.Module]) -> None:
    """Deprecated alias of :func:`unregister_layer`.

    Args:
        module_type: The module class.
    """
    warnings.warn(
        "unregister_block() is deprecated; use unregister_layer().",
        DeprecationWarning,
        stacklevel=2,
    )
    unregister_layer(module_type)


def find_layers(
    model: nn.Module,
    *,
    select: Callable[[str, nn.Module], bool] | None = None,
    fallback: bool = False,
) -> dict[str, LayerAdapter]:
    """Adapters for every registered layer of a model, keyed by the FQN of its weight.

    Args:
        model: The model.
        select: Optional filter ``(key, module) -> bool``.
        fallback: Also cover every other module with parameters of its own (norms, embeddings,
            custom layers) through :class:`~lightning_fls.layers.GenericAdapter`.

    Returns:
        Adapters keyed by, e.g., ``"encoder.0.weight"``, in ``named_modules`` order.
    """
    found: dict[str, LayerAdapter] = {}
    out_projections = attention_parents(model)
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if isinstance(adapter, LinearAdapter) and id(module) in out_projections:
            adapter = AttentionOutputAdapter(module, out_projections[id(module)])
        if adapter is not None and getattr(module, adapter.key_parameter, None) is None:
            adapter = None  # e.g. attention with separate q/k/v weights: no packed weight
        if adapter is None and fallback and any(True for _ in module.parameters(recurse=False)):
            adapter = GenericAdapter(module)
        if adapter is None:
            continue
        key = f"{name}.{adapter.key_parameter}" if name else adapter.key_parameter
        if select is None or select(key, module):
            found[key] = adapter
    return found
