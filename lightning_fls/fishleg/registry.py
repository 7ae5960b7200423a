"""Which layers get a curvature block, and of which structure.

* The **registry** maps module types to :class:`~lightning_fls.fishleg.layers.LayerAdapter`
  classes (Linear, Conv2d and nn.MultiheadAttention built in); :func:`register_block` opens it
  to users.
* The **policy** (:class:`StructurePolicy`) chooses the structure of each layer's block: by
  fully-qualified name, by module type, and by size (a Kronecker block stores ``d_out² + d_in'²``
  factor entries and costs ``O(d³)`` per update, so beyond ``max_kronecker_side`` it does not pay).
* :func:`build_blocks` applies both to a model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lightning_fls._validation import check_choice, check_positive, check_positive_int
from lightning_fls.fishleg.attention import (
    AttentionOutputAdapter,
    MultiheadAttentionAdapter,
    attention_parents,
)
from lightning_fls.fishleg.base import CurvatureBlock
from lightning_fls.fishleg.block_diagonal import BlockDiagonalBlock
from lightning_fls.fishleg.diagonal import DiagonalBlock
from lightning_fls.fishleg.kronecker import KroneckerBlock
from lightning_fls.fishleg.layers import Conv2dAdapter, GenericAdapter, LayerAdapter, LinearAdapter

Structure = Literal["kronecker", "block_diagonal", "diagonal"]
"""Names of the block structures."""

STRUCTURES: tuple[str, ...] = ("kronecker", "block_diagonal", "diagonal")

_ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.MultiheadAttention: MultiheadAttentionAdapter,
}


def register_block(
    module_type: type[nn.Module], adapter: type[LayerAdapter], *, overwrite: bool = False
) -> None:
    """Register how a module type gets a curvature block.

    The adapter tells how the module's parameters form the canonical matrix and how its
    per-example gradients are rebuilt from captured inputs and output gradients; every block
    structure (:data:`STRUCTURES`) can then be built for it.

    Args:
        module_type: The ``nn.Module`` subclass (its subclasses are covered too).
        adapter: A :class:`~lightning_fls.fishleg.layers.LayerAdapter` subclass for it.
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


def unregister_block(module_type: type[nn.Module]) -> None:
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
    """Module types that can get a curvature block.

    Returns:
        The registered module classes.
    """
    return tuple(_ADAPTERS)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a module, or None if its type is not registered.

    The most specific registered class in the module's MRO wins.

    Args:
        module: Any module.

    Returns:
        A new adapter wrapping ``module``, or None.
    """
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls](module)
    return None


@dataclass(frozen=True)
class StructurePolicy:
    """Chooses the structure of each layer's curvature block.

    Rules, first match wins: ``by_name`` (glob on the layer's key, the fully-qualified name of
    its weight, e.g. ``"encoder.*.weight"``), then ``by_type`` (module class name, e.g.
    ``"Conv2d"``), then ``fallback`` for layers seen through the generic adapter (any module
    without a registered one), then ``default``. A Kronecker choice is replaced by ``oversize``
    when a factor side (``d_out`` or ``d_in'``) exceeds ``max_kronecker_side``.

    Args:
        default: Structure for layers no rule names.
        by_type: Structure per module class name.
        by_name: Structure per glob pattern on layer keys.
        max_kronecker_side: Largest factor side a Kronecker block may have.
        oversize: Structure used instead of a Kronecker block that is too large.
        fallback: Structure for layers without a registered adapter.
        block_size: ``B`` of block-diagonal blocks.
        use_scale: Whether Kronecker blocks learn the elementwise rescaling ``D`` (see
            :class:`~lightning_fls.fishleg.KroneckerBlock`).

    Raises:
        ValueError: If a structure name or a size is invalid.
    """

    default: Structure = "kronecker"
    by_type: Mapping[str, Structure] = field(default_factory=dict)
    by_name: Mapping[str, Structure] = field(default_factory=dict)
    max_kronecker_side: int = 4096
    oversize: Structure = "diagonal"
    fallback: Structure = "diagonal"
    block_size: int = 50
    use_scale: bool = False

    def __post_init__(self) -> None:
        check_choice("default", self.default, STRUCTURES)
        check_choice("oversize", self.oversize, STRUCTURES)
        check_choice("fallback", self.fallback, STRUCTURES)
        for name, structure in {**self.by_type, **self.by_name}.items():
            check_choice(f"structure for {name!r}", structure, STRUCTURES)
        check_positive_int("max_kronecker_side", self.max_kronecker_side)
        check_positive_int("block_size", self.block_size)

    def choose(
        self, key: str, module: nn.Module, shape: tuple[int, int], *, generic: bool = False
    ) -> Structure:
        """The structure for one layer.

        Args:
            key: The layer's key (its weight's fully-qualified name).
            module: The layer.
            shape: Its canonical shape ``(d_out, d_in')``.
            generic: Whether the layer is seen through the generic (fallback) adapter.

        Returns:
            A structure name.
        """
        structure: Structure | None = None
        for pattern, value in self.by_name.items():
            if fnmatch.fnmatchcase(key, pattern):
                structure = value
                break
        if structure is None:
            default = self.fallback if generic else self.default
            structure = self.by_type.get(type(module).__name__, default)
        if structure == "kronecker" and max(shape) > self.max_kronecker_side:
            structure = self.oversize
        return structure

    def make_block(
        self,
        structure: Structure,
        shape: tuple[int, int],
        *,
        init_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> CurvatureBlock:
        """Build a block of the given structure.

        Args:
            structure: One of :data:`STRUCTURES`.
            shape: Canonical shape.
            init_scale: ``Q₀ = init_scale · I``.
            dtype: Dtype of the auxiliary parameters.
            device: Their device.

        Returns:
            The new block.
        """
        check_choice("structure", structure, STRUCTURES)
        init_scale = check_positive("init_scale", init_scale)
        if structure == "kronecker":
            return KroneckerBlock(
                shape, init_scale=init_scale, use_scale=self.use_scale, dtype=dtype, device=device
            )
        if structure == "block_diagonal":
            return BlockDiagonalBlock(
                shape, block_size=self.block_size, init_scale=init_scale, dtype=dtype, device=device
            )
        return DiagonalBlock(shape, init_scale=init_scale, dtype=dtype, device=device)


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
            custom layers) through :class:`~lightning_fls.fishleg.layers.GenericAdapter`.

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


def build_blocks(
    adapters: Mapping[str, LayerAdapter],
    *,
    policy: StructurePolicy | None = None,
    init_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, CurvatureBlock]:
    """One curvature block per layer, on the device of the layer's weight.

    Args:
        adapters: Layers, keyed as by :func:`find_layers`.
        policy: The structure policy (default: :class:`StructurePolicy()`).
        init_scale: ``Q₀ = init_scale · I`` for every block (e.g. ``1/γ``).
        dtype: Dtype of the auxiliary parameters.

    Returns:
        Blocks keyed like ``adapters``.
    """
    policy = policy or StructurePolicy()
    blocks: dict[str, CurvatureBlock] = {}
    for key, adapter in adapters.items():
        shape = adapter.canonical_shape
        generic = isinstance(adapter, GenericAdapter)
        structure = policy.choose(key, adapter.module, shape, generic=generic)
        device = getattr(adapter.module, adapter.key_parameter).device
        blocks[key] = policy.make_block(
            structure, shape, init_scale=init_scale, dtype=dtype, device=device
        )
    return blocks
