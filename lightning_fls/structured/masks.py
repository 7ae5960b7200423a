"""Keep-masks that remove whole units of coupled groups, and which units are already all zero."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_fls.structured.discovery import check_members
from lightning_fls.structured.groups import GroupFamily, GroupMember


def structured_masks(
    model: nn.Module, families: Sequence[GroupFamily], removed: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Boolean keep-masks removing, in each family, the units flagged in ``removed``.

    Only producer and consumer members are masked (passive ones, such as BatchNorm statistics,
    are only resized by :func:`~lightning_fls.compact`). A parameter in several families (a
    Linear layer that consumes one family's neurons and produces another's) gets one mask, the
    conjunction. Multiplying each parameter by its mask zeroes the removed units' weights, so
    that :func:`~lightning_fls.compact` can cut them out.

    Args:
        model: The model the families were found in.
        families: From :func:`~lightning_fls.find_groups`.
        removed: ``{family name: bool [units]}``, True for a unit to remove. Families missing
            from it remove nothing.

    Returns:
        ``{parameter FQN: bool mask shaped like the parameter}``, ``True`` = kept, on the
        parameter's device, for every producer and consumer member of ``families``.

    Raises:
        ValueError: If ``removed`` names no family of ``families``, a flag tensor is not bool
            ``[units]``, or a member does not fit the model.
    """
    by_name = {family.name: family for family in families}
    for name, flags in removed.items():
        family = by_name.get(name)
        if family is None:
            raise ValueError(
                f"`removed` names {name!r}, which is not one of the families: {list(by_name)}."
            )
        if not isinstance(flags, Tensor) or flags.dtype != torch.bool:
            raise ValueError(f"`removed[{name!r}]` must be a bool tensor, got {flags!r}.")
        if tuple(flags.shape) != (family.units,):
            raise ValueError(
                f"`removed[{name!r}]` must have shape ({family.units},) (one flag per unit), "
                f"got {tuple(flags.shape)}."
            )
    parameters = dict(model.named_parameters())
    masks: dict[str, Tensor] = {}
    for family in families:
        check_members(family, parameters | dict(model.named_buffers()), "`families`")
        flagged = removed.get(family.name)
        for member in family.members:
            if member.role == "passive":
                continue
            param = parameters.get(member.parameter)
            if param is None:
                raise ValueError(
                    f"Member {member.parameter!r} of family {family.name!r} is a {member.role} "
                    "but not a parameter of the model."
                )
            mask = masks.setdefault(
                member.parameter, torch.ones_like(param, dtype=torch.bool, device=param.device)
            )
            if flagged is not None and bool(flagged.any()):
                positions = member.indices[flagged.cpu()].reshape(-1).to(param.device)
                mask.index_fill_(member.dim, positions, False)
    return masks


def zero_units(tensors: Mapping[str, Tensor], family: GroupFamily) -> Tensor:
    """Which units of ``family`` have every producer and consumer entry exactly zero.

    Args:
        tensors: The model's parameters (and buffers) by name.
        family: The family.

    Returns:
        bool ``[units]``.
    """
    nonzero = torch.zeros(family.units, dtype=torch.bool)
    for member in family.members:
        if member.role != "passive":
            nonzero |= _unit_slices(tensors[member.parameter], member).ne(0).any(dim=1).cpu()
    return ~nonzero


def _unit_slices(tensor: Tensor, member: GroupMember) -> Tensor:
    """The entries unit ``u`` owns, as row ``u`` of ``[units, rest]``."""
    index = member.indices.reshape(-1).to(tensor.device)
    picked = tensor.detach().index_select(member.dim, index).movedim(member.dim, 0)
    return picked.reshape(member.units, -1)
