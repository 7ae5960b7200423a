"""Physically removing the units of coupled groups whose weights are all zero.

A unit whose producer entries (output rows or channels, bias entries) and consumer entries
(input columns of the layers reading it) are all exactly zero contributes nothing to the
model's output: whatever the activations do to the zero output, the consumers multiply it by
zero. Cutting its slices out of every member tensor therefore leaves the outputs unchanged
(up to float rounding of the shorter sums), and makes the layers smaller.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_fls.structured.attention import PrunedMultiheadAttention
from lightning_fls.structured.discovery import ExampleInputs, check_members, discover
from lightning_fls.structured.groups import GRANULARITIES, GroupFamily
from lightning_fls.structured.masks import zero_units


def compact(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    *,
    families: Sequence[GroupFamily] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """A smaller copy of ``model`` without the units whose weights are all zero.

    In each family, a unit is removed when every producer and consumer entry it owns is exactly
    zero; its passive entries (BatchNorm weight, bias, running statistics) go with it. Layers
    are resized: Linear ``out_features``/``in_features``, Conv2d ``out_channels``/
    ``in_channels``, BatchNorm ``num_features``, Hugging Face ``Conv1D`` ``nf``/``nx``. Attention
    modules lose heads:

    * ``nn.MultiheadAttention`` ties its inner width to ``embed_dim``, so it is replaced by a
      :class:`~lightning_fls.structured.PrunedMultiheadAttention` with the same parameter names,
      forward arguments and outputs (its returned attention weights average the kept heads);
    * Hugging Face BERT-like self-attention (``num_attention_heads``, ``all_head_size``) and
      GPT-2 attention (``num_heads``, ``split_size``) get those attributes updated, as does
      ``num_heads`` of other attention reading its inner width as ``num_heads · head_dim``
      (:class:`~lightning_fls.models.SelfAttention`). The shared
      ``config`` is not changed, so ``save_pretrained``/``from_pretrained`` cannot rebuild the
      smaller model (transformers 5 has no ``pruned_heads``). Save the masked model instead:
      its zeros survive ``save_pretrained``/``from_pretrained``, and ``compact`` of the reloaded
      model gives the same smaller model (or load a saved ``state_dict`` into another
      compacted copy).

    Modules of other types keep their attributes: a custom module whose members a registered
    rule names must read its sizes from its parameters.

    Args:
        model: The masked model; it is not modified unless ``inplace``.
        example_inputs: The forward's input (a tensor, or a tuple of positional arguments), for
            finding the groups of a traced model that flattens a channel-producing layer's
            output; see :func:`~lightning_fls.find_groups`.
        families: The families to compact; None finds those of every granularity.
        inplace: Cut the units out of ``model`` itself (its modules keep their identity, except
            an ``nn.MultiheadAttention`` that loses heads, which is replaced) instead of a deep
            copy. Every check runs before the first cut, so on an error ``model`` is unchanged.
            Optimizers built on the old parameters no longer hold the model's parameters.

    Returns:
        A new model (a deep copy with the units cut out), or ``model`` itself when ``inplace``,
        in the same training mode, whose outputs equal the masked model's to float tolerance.

    Raises:
        ValueError: If no unit of any family is all zero (the model is not pruned structurally);
            if every unit of a family is zero (a layer cannot be emptied); if a family does not
            fit the model or names attention whose heads cannot be resized; or as
            :func:`~lightning_fls.find_groups`.
    """
    if families is None:
        found = discover(model, GRANULARITIES, example_inputs)
        families = [family for granularity in GRANULARITIES for family in found[granularity][0]]
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    removed: list[tuple[GroupFamily, Tensor]] = []
    for family in families:
        if not isinstance(family, GroupFamily):
            raise ValueError(f"`families` must hold GroupFamily objects, got {family!r}.")
        check_members(family, tensors, "`families`")
        zero = zero_units(tensors, family)
        if bool(zero.all()):
            raise ValueError(
                f"Every {family.granularity} of {family.name!r} ({family.units}) has all-zero "
                f"weights: a layer cannot be emptied; keep at least one {family.granularity}."
            )
        if bool(zero.any()):
            removed.append((family, zero))
        if family.granularity == "head":
            _check_attention(model, family)
    if not removed:
        raise ValueError(
            f"No unit of {type(model).__name__} has all-zero weights in its "
            f"{len(families)} group families, so nothing can be removed. Prune it structurally "
            "first, e.g. with `lightning_fls.prune_one_shot(..., granularity=...)`, or zero "
            "whole units with `lightning_fls.structured_masks`."
        )
    new = model if inplace else copy.deepcopy(model)
    cuts: dict[str, dict[int, set[int]]] = {}
    for family, zero in removed:
        for member in family.members:
            positions = member.indices[zero].reshape(-1).tolist()
            cuts.setdefault(member.parameter, {}).setdefault(member.dim, set()).update(positions)
    _cut_tensors(new, cuts)
    touched = {name.rpartition(".")[0] for name in cuts}
    for name in touched:
        _resize(new.get_submodule(name))
    for family, zero in removed:
        if family.granularity == "head":
            _remove_heads(new, family.name, zero)
    return new


def _cut_tensors(model: nn.Module, cuts: dict[str, dict[int, set[int]]]) -> None:
    """Replace each named tensor (and every alias of it) by the slices not cut."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, dims in cuts.items():
        old = tensors[name]
        new = old.detach()
        for dim, positions in dims.items():
            keep = [i for i in range(old.shape[dim]) if i not in positions]
            new = new.index_select(dim, torch.tensor(keep, dtype=torch.int64, device=old.device))
        new = new.clone()
        replacement: Tensor = (
            nn.Parameter(new, requires_grad=old.requires_grad)
            if isinstance(old, nn.Parameter)
            else new
        )
        for alias in aliases.get(id(old), [name]):
            owner_name, _, leaf = alias.rpartition(".")
            owner = model.get_submodule(owner_name)
            if isinstance(replacement, nn.Parameter):
                owner._parameters[leaf] = replacement
            else:
                owner._buffers[leaf] = replacement


def _conv1d_type() -> type | None:
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d if isinstance(conv1d, type) else None


def _resize(module: nn.Module) -> None:
    """Set a resized layer's size attributes from its tensors."""
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels = int(module.weight.shape[0])
        module.in_channels = int(module.weight.shape[1]) * module.groups
    elif isinstance(module, _BatchNorm):
        stats = module.running_mean if module.running_mean is not None else module.weight
        if stats is not None:
            module.num_features = int(stats.shape[0])
    elif conv1d is not None and isinstance(module, conv1d):
        rows, columns = module.get_parameter("weight").shape
        _set(module, nx=int(rows), nf=int(columns))


def _check_attention(model: nn.Module, family: GroupFamily) -> None:
    """Refuse head families on modules whose head count :func:`_remove_heads` cannot update."""
    try:
        module = model.get_submodule(family.name)
    except AttributeError:
        raise ValueError(f"Head family {family.name!r} names no module of the model.") from None
    if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        return
    if all(
        hasattr(module, a) for a in ("num_attention_heads", "attention_head_size", "all_head_size")
    ):
        return
    if all(hasattr(module, a) for a in ("num_heads", "head_dim")):
        return
    raise ValueError(
        f"compact cannot remove heads of {type(module).__name__} {family.name!r}: it knows "
        "nn.MultiheadAttention, BERT-like (num_attention_heads, all_head_size), GPT-2-like "
        "(num_heads, head_dim, split_size) and other (num_heads, head_dim) attention."
    )


def _remove_heads(model: nn.Module, name: str, removed: Tensor) -> None:
    """Update (or, for ``nn.MultiheadAttention``, replace) attention whose tensors were cut."""
    module = model.get_submodule(name)
    heads = int((~removed).sum())
    if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        kept = [h for h in range(removed.numel()) if not removed[h]]
        if isinstance(module, PrunedMultiheadAttention):
            original, kept = module.original_heads, [module.kept_heads[h] for h in kept]
        else:
            original = module.num_heads
        replacement = PrunedMultiheadAttention(
            module.embed_dim,
            heads,
            module.head_dim,
            kept_heads=tuple(kept),
            original_heads=original,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            batch_first=module.batch_first,
        )
        replacement.in_proj_weight = module.in_proj_weight
        replacement.in_proj_bias = module.in_proj_bias
        replacement.out_proj = module.out_proj
        replacement.train(module.training)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, replacement)
    elif hasattr(module, "num_attention_heads"):
        size = _size(module, "attention_head_size")
        _set(module, num_attention_heads=heads, all_head_size=heads * size)
    elif hasattr(module, "split_size"):
        _set(module, num_heads=heads, split_size=heads * _size(module, "head_dim"))
    else:  # attention whose inner width is num_heads · head_dim (lightning_fls' SelfAttention)
        _set(module, num_heads=heads)


def _size(module: nn.Module, attribute: str) -> int:
    """An integer attribute of a module."""
    return int(getattr(module, attribute))


def _set(module: nn.Module, **sizes: int) -> None:
    """Set plain (size) attributes of a module."""
    for name, value in sizes.items():
        setattr(module, name, value)
