"""Which structure each layer's curvature block has, and the blocks of a model.

Which layers there are is :mod:`lightning_fls.layers`' business (adapters and their registry).

* The **policy** (:class:`StructurePolicy`) chooses the structure of each layer's block: by
  fully-qualified name, by module type, and by size (a Kronecker block stores ``d_out² + d_in'²``
  factor entries and costs ``O(d³)`` per update, so beyond ``max_kronecker_side`` it does not pay).
* :func:`build_blocks` applies both to a model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from lightning_fls._validation import check_choice, check_positive, check_positive_int
from lightning_fls.fishleg.base import CurvatureBlock
from lightning_fls.fishleg.block_diagonal import BlockDiagonalBlock
from lightning_fls.fishleg.diagonal import DiagonalBlock
from lightning_fls.fishleg.kronecker import KroneckerBlock
from lightning_fls.fishleg.statistics import StatisticsAccumulator
from lightning_fls.layers import GenericAdapter, LayerAdapter

Structure = Literal["kronecker", "block_diagonal", "diagonal"]
"""Names of the block structures."""

STRUCTURES: tuple[str, ...] = get_args(Structure)


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


_BLOCK_CLASSES: dict[str, type[CurvatureBlock]] = {
    "kronecker": KroneckerBlock,
    "block_diagonal": BlockDiagonalBlock,
    "diagonal": DiagonalBlock,
}


def block_class(structure: Structure) -> type[CurvatureBlock]:
    """The curvature block class of a structure.

    Raises:
        ValueError: If ``structure`` is not one of :data:`STRUCTURES`.
    """
    check_choice("structure", structure, STRUCTURES)
    return _BLOCK_CLASSES[structure]


def new_layer_statistics(
    key: str,
    adapter: LayerAdapter,
    policy: StructurePolicy | None = None,
    *,
    product_dtype: torch.dtype | None = None,
    token_fraction: float = 1.0,
    seed: int = 0,
) -> StatisticsAccumulator:
    """An accumulator of the statistics the layer's block will need, without building it.

    Args:
        key: The layer's key.
        adapter: The layer.
        policy: The structure policy (default: :class:`StructurePolicy()`).
        product_dtype: Dtype of the Kronecker statistics' products (:class:`StatisticsAccumulator`).
        token_fraction: Fraction of each example's positions in the Kronecker statistics
            (:class:`StatisticsAccumulator`).
        seed: Seed of the kept positions' draws.

    Returns:
        A fresh accumulator (block size from the policy).
    """
    policy = policy or StructurePolicy()
    shape = adapter.canonical_shape
    structure = policy.choose(
        key, adapter.module, shape, generic=isinstance(adapter, GenericAdapter)
    )
    needs = _BLOCK_CLASSES[structure].statistics_needed
    return StatisticsAccumulator(
        needs,
        block_size=policy.block_size,
        product_dtype=product_dtype,
        token_fraction=token_fraction,
        seed=seed,
    )


def build_blocks(
    adapters: Mapping[str, LayerAdapter],
    *,
    policy: StructurePolicy | None = None,
    init_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    uninitialised: bool = False,
) -> dict[str, CurvatureBlock]:
    """One curvature block per layer, on the device of the layer's weight.

    Args:
        adapters: Layers, keyed as by :func:`find_layers`.
        policy: The structure policy (default: :class:`StructurePolicy()`).
        init_scale: ``Q₀ = init_scale · I`` for every block (e.g. ``1/γ``).
        dtype: Dtype of the auxiliary parameters.
        uninitialised: Allocate the parameters without writing them (``to_empty``), for blocks
            that :meth:`~CurvatureBlock.init_from_statistics` sets at once: their pages are
            never touched, so a block-diagonal λ (``n·B`` floats) adds no resident memory
            beside the statistics that become it. Their values are undefined until then.

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
        block = policy.make_block(
            structure,
            shape,
            init_scale=init_scale,
            dtype=dtype,
            device="meta" if uninitialised else device,
        )
        blocks[key] = block.to_empty(device=device) if uninitialised else block
    return blocks
