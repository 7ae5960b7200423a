"""The data types of structured pruning: coupled groups of parameter slices.

A *unit* (a Linear layer's output neuron, a Conv2d output channel, an attention head) owns slices
of several tensors that can only be removed together: the producer's output rows (and bias
entries), the consumers' matching input columns, and per-unit statistics such as a BatchNorm's.
A :class:`GroupFamily` lists them, one :class:`GroupMember` per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Granularity = Literal["neuron", "channel", "head"]
Role = Literal["producer", "consumer", "passive"]

#: The accepted values of ``granularity``.
GRANULARITIES: tuple[str, ...] = ("neuron", "channel", "head")

#: The accepted values of :attr:`GroupMember.role`.
ROLES: tuple[str, ...] = ("producer", "consumer", "passive")


@dataclass(frozen=True, eq=False)
class GroupMember:
    """The slices of one tensor that the units of a family own.

    Unit ``u`` owns ``tensor.index_select(dim, indices[u])``.

    Attributes:
        parameter: Fully-qualified name of the tensor in ``model.named_parameters()`` (or in
            ``model.named_buffers()`` for a BatchNorm's running statistics), e.g.
            ``"features.0.weight"``.
        dim: The dimension the slices are taken along (``0`` for a Linear's output rows, ``1``
            for its input columns).
        indices: int64 ``[units, per_unit]``: the positions along ``dim`` each unit owns.
        role: ``"producer"`` (the output rows or channels, and bias entries, of the layer whose
            units are removed), ``"consumer"`` (the input columns of the layers reading them) or
            ``"passive"`` (per-unit tensors that are only resized, such as BatchNorm's weight,
            bias and running statistics; they are never masked).

    Raises:
        ValueError: If ``role`` is not one of :data:`ROLES`, ``dim`` is negative, or
            ``indices`` is not a non-empty int64 ``[units, per_unit]`` tensor.
    """

    parameter: str
    dim: int
    indices: Tensor
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"`role` must be one of {ROLES}, got {self.role!r}.")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise ValueError(f"`dim` must be an integer >= 0, got {self.dim!r}.")
        if (
            not isinstance(self.indices, Tensor)
            or self.indices.dtype != torch.int64
            or self.indices.dim() != 2
            or self.indices.numel() == 0
        ):
            raise ValueError(
                f"`indices` of {self.parameter!r} must be a non-empty int64 tensor "
                f"[units, per_unit], got {self.indices!r}."
            )

    @property
    def units(self) -> int:
        """Number of units (rows of :attr:`indices`)."""
        return int(self.indices.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroupMember):
            return NotImplemented
        return (
            (self.parameter, self.dim, self.role) == (other.parameter, other.dim, other.role)
            and self.indices.shape == other.indices.shape
            and bool(torch.equal(self.indices, other.indices))
        )

    def __hash__(self) -> int:
        return hash((self.parameter, self.dim, self.role, tuple(self.indices.shape)))


@dataclass(frozen=True)
class GroupFamily:
    """The units of one producer layer (or of one attention module's heads) and what they own.

    Attributes:
        name: Fully-qualified name of the producer module (for heads, of the attention module),
            e.g. ``"features.0"`` or ``"encoder.layer.0.attention.self"``.
        granularity: One of :data:`GRANULARITIES`.
        units: Number of units (neurons, channels or heads).
        members: The tensors the units own; at least one producer.

    Raises:
        ValueError: If ``granularity`` is unknown, ``units`` < 1, there is no producer member,
            or a member's indices do not have ``units`` rows.
    """

    name: str
    granularity: str
    units: int
    members: tuple[GroupMember, ...]

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}."
            )
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise ValueError(f"`units` of family {self.name!r} must be >= 1, got {self.units!r}.")
        if not any(m.role == "producer" for m in self.members):
            raise ValueError(f"Family {self.name!r} has no producer member.")
        for member in self.members:
            if member.units != self.units:
                raise ValueError(
                    f"Member {member.parameter!r} of family {self.name!r} has indices for "
                    f"{member.units} units, the family has {self.units}."
                )

    @property
    def parameters(self) -> tuple[str, ...]:
        """Names of the members' tensors, in order (a name may repeat)."""
        return tuple(m.parameter for m in self.members)


def unit_indices(units: int, per_unit: int = 1, *, offsets: tuple[int, ...] = (0,)) -> Tensor:
    """Indices of consecutive blocks: unit ``u`` owns ``o + u·per_unit + k`` for each offset ``o``.

    Args:
        units: Number of units.
        per_unit: Consecutive positions per unit and offset (``head_dim`` for heads, ``H·W``
            for a channel read by a Linear after a flatten).
        offsets: Starts of the blocks, e.g. ``(0, E, 2E)`` for packed q/k/v rows.

    Returns:
        int64 ``[units, len(offsets) · per_unit]``.
    """
    block = torch.arange(units * per_unit, dtype=torch.int64).reshape(units, per_unit)
    return torch.cat([block + offset for offset in offsets], dim=1)
