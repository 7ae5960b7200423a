"""Group rules: the coupled groups of module types whose structure is known.

Some blocks cannot be traced by ``torch.fx`` (Hugging Face models), or hide their coupling inside
one fused call (``nn.MultiheadAttention``). A *rule* maps ``(module FQN, module, granularity)`` to
the block's :class:`~lightning_fls.structured.GroupFamily` list. Rules are keyed by module type
(subclasses are covered too; the most specific registered class wins):

* ``nn.TransformerEncoderLayer``: neurons of ``linear1`` (rows and bias) read by ``linear2``
  (columns); heads of ``self_attn`` (packed q/k/v rows and bias of each head, ``out_proj``
  columns);
* Hugging Face ``BertLayer``: neurons of ``intermediate.dense`` read by ``output.dense``; heads
  of ``attention.self`` (``query``/``key``/``value`` rows and bias) read by
  ``attention.output.dense`` (and the same for ``crossattention`` when present);
* Hugging Face ``GPT2Block``: neurons of ``mlp.c_fc`` (a ``Conv1D``, weight ``[in, out]``: a
  unit is a column and a bias entry) read by ``mlp.c_proj`` (rows); heads of ``attn`` (the
  q/k/v columns of ``c_attn`` and their bias) read by ``attn.c_proj`` (rows);
* the package's own :class:`~lightning_fls.models.TransformerBlock` (the blocks of
  :class:`~lightning_fls.models.PatchTransformer`): neurons of ``mlp.fc1`` read by ``mlp.fc2``;
  heads of ``attn``, an ``nn.MultiheadAttention`` (as for ``nn.TransformerEncoderLayer``) or a
  :class:`~lightning_fls.models.SelfAttention` (``q_proj``/``k_proj``/``v_proj`` rows and bias
  of each head, read by ``o_proj`` columns).

The Hugging Face rules are registered once ``transformers`` has been imported by the user, and
the ``TransformerBlock`` rule once :mod:`lightning_fls.models` has: ``lightning_fls.structured``
imports neither.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from lightning_fls.structured.attention import PrunedMultiheadAttention
from lightning_fls.structured.groups import GroupFamily, GroupMember, unit_indices

GroupRule = Callable[[str, nn.Module, str], list[GroupFamily]]
"""``rule(module_fqn, module, granularity) -> families`` with fully-qualified member names."""


def _int(module: nn.Module, attribute: str) -> int:
    """An integer attribute of a module (a size such as ``num_heads``)."""
    return int(getattr(module, attribute))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear_pair(
    fqn: str, producer: str, consumer: str, model: nn.Module, *, transposed: bool = False
) -> GroupFamily:
    """Family of ``producer``'s output units read by ``consumer`` (both Linear, or both Conv1D).

    ``transposed``: weights are stored ``[in, out]`` (Hugging Face ``Conv1D``).
    """
    first = model.get_submodule(producer)
    weight = first.get_parameter("weight")
    units = int(weight.shape[1] if transposed else weight.shape[0])
    index = unit_indices(units)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    members = [GroupMember(_join(fqn, f"{producer}.weight"), out_dim, index, "producer")]
    if getattr(first, "bias", None) is not None:
        members.append(GroupMember(_join(fqn, f"{producer}.bias"), 0, index, "producer"))
    members.append(GroupMember(_join(fqn, f"{consumer}.weight"), in_dim, index, "consumer"))
    return GroupFamily(_join(fqn, producer), "neuron", units, tuple(members))


def multihead_attention_family(fqn: str, module: nn.Module) -> GroupFamily | None:
    """Head family of an ``nn.MultiheadAttention`` (or of its compacted replacement).

    Head ``h`` owns rows ``o + h·d … o + (h+1)·d − 1`` of ``in_proj_weight`` and
    ``in_proj_bias`` for ``o`` in ``(0, I, 2I)`` (its q, k and v rows; ``I`` = heads · ``d``, the
    embedding size before any head is removed) and the same columns of ``out_proj.weight``.

    Args:
        fqn: The attention module's fully-qualified name.
        module: ``nn.MultiheadAttention`` or :class:`PrunedMultiheadAttention`.

    Returns:
        The family, or None for a configuration whose heads cannot be removed (separate q/k/v
        weights when ``kdim``/``vdim`` differ from ``embed_dim``, ``add_bias_kv``,
        ``add_zero_attn``).
    """
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return None
        heads, head_dim = module.num_heads, module.head_dim
    elif isinstance(module, PrunedMultiheadAttention):
        heads, head_dim = module.num_heads, module.head_dim
    else:
        return None
    inner = heads * head_dim
    rows = unit_indices(heads, head_dim, offsets=(0, inner, 2 * inner))
    columns = unit_indices(heads, head_dim)
    members = [GroupMember(_join(fqn, "in_proj_weight"), 0, rows, "producer")]
    if module.in_proj_bias is not None:
        members.append(GroupMember(_join(fqn, "in_proj_bias"), 0, rows, "producer"))
    members.append(GroupMember(_join(fqn, "out_proj.weight"), 1, columns, "consumer"))
    return GroupFamily(fqn, "head", heads, tuple(members))


def transformer_encoder_layer_rule(
    fqn: str, module: nn.Module, granularity: str
) -> list[GroupFamily]:
    """Groups of an ``nn.TransformerEncoderLayer``.

    Args:
        fqn: The layer's fully-qualified name.
        module: The layer.
        granularity: ``"neuron"`` (the feed-forward block) or ``"head"`` (``self_attn``).

    Returns:
        The families (none for ``"channel"``, or for heads of an unsupported attention).
    """
    if granularity == "neuron":
        return [_linear_pair(fqn, "linear1", "linear2", module)]
    if granularity == "head":
        family = multihead_attention_family(
            _join(fqn, "self_attn"), module.get_submodule("self_attn")
        )
        return [] if family is None else [family]
    return []


def _projection_heads(
    prefix: str, module: nn.Module, projections: tuple[str, ...], output: str, heads: int
) -> GroupFamily:
    """Head family of attention with separate q/k/v Linear layers and an output Linear.

    Head ``h`` owns rows ``h·d … (h+1)·d − 1`` (and bias entries) of each of ``projections``
    and the same columns of ``output`` (``d`` = a projection's rows / ``heads``).
    """
    head_dim = int(module.get_submodule(projections[0]).get_parameter("weight").shape[0]) // heads
    index = unit_indices(heads, head_dim)
    members = []
    for projection in projections:
        linear = module.get_submodule(projection)
        members.append(GroupMember(f"{prefix}.{projection}.weight", 0, index, "producer"))
        if getattr(linear, "bias", None) is not None:
            members.append(GroupMember(f"{prefix}.{projection}.bias", 0, index, "producer"))
    members.append(GroupMember(f"{prefix}.{output}.weight", 1, index, "consumer"))
    return GroupFamily(prefix, "head", heads, tuple(members))


def _bert_heads(fqn: str, attention: nn.Module, name: str) -> GroupFamily:
    """Head family of a BERT ``BertAttention`` (its ``self`` and ``output.dense``)."""
    self_attention = attention.get_submodule("self")
    heads = _int(self_attention, "num_attention_heads")
    head_dim = _int(self_attention, "attention_head_size")
    index = unit_indices(heads, head_dim)
    prefix = _join(fqn, name)
    members = []
    for projection in ("query", "key", "value"):
        linear = self_attention.get_submodule(projection)
        members.append(GroupMember(f"{prefix}.self.{projection}.weight", 0, index, "producer"))
        if getattr(linear, "bias", None) is not None:
            members.append(GroupMember(f"{prefix}.self.{projection}.bias", 0, index, "producer"))
    members.append(GroupMember(f"{prefix}.output.dense.weight", 1, index, "consumer"))
    return GroupFamily(f"{prefix}.self", "head", heads, tuple(members))


def bert_layer_rule(fqn: str, module: nn.Module, granularity: str) -> list[GroupFamily]:
    """Groups of a Hugging Face ``BertLayer`` (and of BERT-like layers with the same layout).

    Args:
        fqn: The layer's fully-qualified name.
        module: The layer.
        granularity: ``"neuron"`` (``intermediate.dense`` → ``output.dense``) or ``"head"``
            (``attention.self``, and ``crossattention.self`` when present).

    Returns:
        The families (none for ``"channel"``).
    """
    if granularity == "neuron":
        return [_linear_pair(fqn, "intermediate.dense", "output.dense", module)]
    if granularity == "head":
        return [
            _bert_heads(fqn, module.get_submodule(name), name)
            for name in ("attention", "crossattention")
            if hasattr(module, name)
        ]
    return []


def transformer_block_rule(fqn: str, module: nn.Module, granularity: str) -> list[GroupFamily]:
    """Groups of a :class:`~lightning_fls.models.TransformerBlock`.

    Args:
        fqn: The block's fully-qualified name.
        module: The block.
        granularity: ``"neuron"`` (``mlp.fc1`` → ``mlp.fc2``) or ``"head"`` (``attn``: an
            ``nn.MultiheadAttention``, its compacted replacement, or a ``SelfAttention`` whose
            ``num_heads`` heads of ``head_dim`` own ``q_proj``/``k_proj``/``v_proj`` rows and
            ``o_proj`` columns).

    Returns:
        The families (none for ``"channel"``, or for heads of an unsupported attention).
    """
    if granularity == "neuron":
        return [_linear_pair(fqn, "mlp.fc1", "mlp.fc2", module)]
    if granularity != "head":
        return []
    attention = module.get_submodule("attn")
    prefix = _join(fqn, "attn")
    if isinstance(attention, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        family = multihead_attention_family(prefix, attention)
        return [] if family is None else [family]
    projections = ("q_proj", "k_proj", "v_proj")
    if all(hasattr(attention, name) for name in (*projections, "o_proj", "num_heads")):
        heads = _int(attention, "num_heads")
        return [_projection_heads(prefix, attention, projections, "o_proj", heads)]
    return []


def gpt2_block_rule(fqn: str, module: nn.Module, granularity: str) -> list[GroupFamily]:
    """Groups of a Hugging Face ``GPT2Block``.

    ``Conv1D`` stores its weight ``[in, out]``: a neuron of ``mlp.c_fc`` is a *column* of its
    weight (and a bias entry), read by a *row* of ``mlp.c_proj``. Head ``h`` owns columns
    ``o + h·d … o + (h+1)·d − 1`` of ``attn.c_attn`` for ``o`` in ``(0, S, 2S)`` (q, k, v; ``S``
    = ``split_size``) and the same rows of ``attn.c_proj``. Cross-attention heads are not
    grouped.

    Args:
        fqn: The block's fully-qualified name.
        module: The block.
        granularity: ``"neuron"`` or ``"head"``.

    Returns:
        The families (none for ``"channel"``).
    """
    if granularity == "neuron":
        return [_linear_pair(fqn, "mlp.c_fc", "mlp.c_proj", module, transposed=True)]
    if granularity != "head":
        return []
    attention = module.get_submodule("attn")
    if getattr(attention, "is_cross_attention", False):
        return []
    heads, head_dim = _int(attention, "num_heads"), _int(attention, "head_dim")
    split = _int(attention, "split_size")
    columns = unit_indices(heads, head_dim, offsets=(0, split, 2 * split))
    rows = unit_indices(heads, head_dim)
    prefix = _join(fqn, "attn")
    members = (
        GroupMember(f"{prefix}.c_attn.weight", 1, columns, "producer"),
        GroupMember(f"{prefix}.c_attn.bias", 0, columns, "producer"),
        GroupMember(f"{prefix}.c_proj.weight", 0, rows, "consumer"),
    )
    return [GroupFamily(prefix, "head", heads, members)]


_RULES: dict[type[nn.Module], GroupRule] = {
    nn.TransformerEncoderLayer: transformer_encoder_layer_rule,
}

_OPTIONAL_RULES: dict[tuple[str, str], GroupRule] = {
    ("transformers.models.bert.modeling_bert", "BertLayer"): bert_layer_rule,
    ("transformers.models.gpt2.modeling_gpt2", "GPT2Block"): gpt2_block_rule,
    ("lightning_fls.models", "TransformerBlock"): transformer_block_rule,
}
"""Rules for types of optional libraries (and of :mod:`lightning_fls.models`, which imports
Lightning), registered once the module has been imported: ``(module, class name)`` to rule."""


def _register_optional_rules() -> None:
    for (module_name, class_name), rule in list(_OPTIONAL_RULES.items()):
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            _RULES.setdefault(cls, rule)
            del _OPTIONAL_RULES[(module_name, class_name)]


def register_group_rule(
    module_type: type[nn.Module], rule: GroupRule, *, overwrite: bool = False
) -> None:
    """Register how the coupled groups of a module type are found.

    Use it for blocks ``torch.fx`` cannot trace, or whose coupling is known. A model holding a
    module of a registered type is not traced: :func:`~lightning_fls.find_groups` returns the
    families of its rule-covered modules only.

    Args:
        module_type: The ``nn.Module`` subclass (its subclasses are covered too).
        rule: ``rule(module_fqn, module, granularity) -> list[GroupFamily]``; member names are
            fully qualified (``module_fqn`` + ``"."`` + the name inside the module), and an
            empty list means the module has no group of that granularity.
        overwrite: Replace an existing registration instead of refusing.

    Raises:
        TypeError: If ``module_type`` is not a module class or ``rule`` is not callable.
        ValueError: If ``module_type`` is registered already and ``overwrite`` is false.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"`module_type` must be an nn.Module subclass, got {module_type!r}.")
    if not callable(rule):
        raise TypeError(f"`rule` must be callable, got {rule!r}.")
    _register_optional_rules()
    if module_type in _RULES and not overwrite:
        raise ValueError(
            f"{module_type.__name__} has a group rule already; pass overwrite=True to replace it."
        )
    _RULES[module_type] = rule


def unregister_group_rule(module_type: type[nn.Module]) -> None:
    """Remove a group rule (built-in ones included).

    Args:
        module_type: The module class.

    Raises:
        KeyError: If it has no rule.
    """
    _register_optional_rules()
    if module_type not in _RULES:
        raise KeyError(f"{module_type.__name__} has no group rule.")
    del _RULES[module_type]


def rule_for(module: nn.Module) -> tuple[type[nn.Module], GroupRule] | None:
    """The rule covering a module, or None.

    Args:
        module: Any module.

    Returns:
        ``(registered class, rule)`` for the most specific registered class in the module's MRO.
    """
    _register_optional_rules()
    for cls in type(module).__mro__:
        if cls in _RULES:
            return cls, _RULES[cls]
    return None
