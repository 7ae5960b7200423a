"""Finding a model's coupled groups: through registered rules, or by tracing with ``torch.fx``."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_fls._validation import check_choice, check_patterns
from lightning_fls.masks import match_names
from lightning_fls.structured.attention import PrunedMultiheadAttention
from lightning_fls.structured.groups import GRANULARITIES, GroupFamily
from lightning_fls.structured.rules import GroupRule, rule_for
from lightning_fls.structured.tracing import NeedsShapesError, trace, traced_families

ExampleInputs = Tensor | tuple[Any, ...]
"""A tensor, or a tuple of the model's positional arguments."""

Discovered = dict[str, tuple[list[GroupFamily], dict[str, str]]]
"""Per granularity: ``(families, reasons)`` (see :func:`discover`)."""


def find_groups(
    model: nn.Module,
    granularity: str,
    example_inputs: ExampleInputs | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[GroupFamily]:
    """The coupled groups of ``model`` whose units can be removed together.

    Modules of a type with a registered group rule (:func:`~lightning_fls.register_group_rule`;
    built in: ``nn.TransformerEncoderLayer``, Hugging Face ``BertLayer`` and ``GPT2Block``) get
    their families from the rule; a model holding any of them is not traced, so its other layers
    form no group. Any other model is traced with ``torch.fx.symbolic_trace``:

    * ``"neuron"``: a Linear layer's output neurons, when its output reaches, through elementwise
      operations only (activations, dropout, arithmetic with constants), Linear layers' inputs;
    * ``"channel"``: a Conv2d layer's (``groups=1``) output channels, when its output reaches,
      through BatchNorm2d (whose weight, bias and running statistics become passive members),
      elementwise operations and 2-D pooling, Conv2d layers' inputs, or Linear layers' after a
      flatten of ``[N, C, H, W]`` (channel ``c`` owns columns ``c·H·W … (c+1)·H·W − 1``;
      ``H·W`` is read from a forward with ``example_inputs``);
    * ``"head"``: attention heads (rules only).

    A layer whose output reaches the model output, a residual add, a concat, a reshape other
    than that flatten, or any operation the walk does not understand forms no group; it is left
    out silently, unless an ``include`` pattern names only such layers.

    Args:
        model: The model; it is not modified.
        granularity: One of ``"neuron"``, ``"channel"``, ``"head"``.
        example_inputs: The forward's input (a tensor, or a tuple of positional arguments).
            Needed when a traced model flattens a producer's output; unused with rules.
        include: Glob patterns (``fnmatch``, as in :func:`lightning_fls.masks.match_names`) on
            the producer modules' FQNs (for heads, the attention modules'); None for all.
        exclude: Patterns of producers to leave out.

    Returns:
        One :class:`~lightning_fls.GroupFamily` per producer (or attention module), in module
        order.

    Raises:
        ValueError: If ``granularity`` is unknown; a pattern matches no candidate layer; an
            ``include`` pattern names only layers that form no group (the message says why);
            the model cannot be traced and no rule covers it; a flatten needs
            ``example_inputs`` that were not given; or a rule returns inconsistent families.
        TypeError: If ``include``/``exclude`` are not lists of strings.
    """
    check_choice("granularity", granularity, GRANULARITIES)
    included = check_patterns("include", include)
    excluded = check_patterns("exclude", exclude)
    families, reasons = discover(model, (granularity,), example_inputs)[granularity]
    return select(model, families, reasons, granularity, included, excluded)


def discover(
    model: nn.Module, granularities: Iterable[str], example_inputs: ExampleInputs | None
) -> Discovered:
    """Families and, for every other candidate layer, why it is none, for each granularity.

    Args:
        model: The model.
        granularities: Values of :data:`~lightning_fls.structured.groups.GRANULARITIES`.
        example_inputs: As in :func:`find_groups`.

    Returns:
        ``{granularity: (families, {candidate FQN: reason clause})}``.

    Raises:
        ValueError: As :func:`find_groups`.
    """
    covered = _rule_covered(model)
    found: Discovered = {}
    if covered:
        types = sorted({cls.__name__ for _, _, cls, _ in covered})
        for granularity in granularities:
            families = []
            for fqn, module, cls, rule in covered:
                families += _checked(model, rule(fqn, module, granularity), cls, granularity)
            reasons: dict[str, str] = {}
            for name in _candidates(model, granularity):
                owner = next((c for c in covered if _inside(name, c[0])), None)
                if owner is None:
                    reasons[name] = (
                        f"which no group rule covers (a model holding {', '.join(types)} "
                        "is not traced)"
                    )
                else:
                    reasons[name] = (
                        f"which the group rule for {owner[2].__name__} {owner[0]!r} does not "
                        f"make a {granularity} group"
                    )
            found[granularity] = (families, reasons)
        return found
    graph_module = trace(model, example_inputs)
    for granularity in granularities:
        try:
            found[granularity] = traced_families(model, graph_module, granularity)
        except NeedsShapesError:
            raise ValueError(
                f"`example_inputs` are needed to find the {granularity} groups of "
                f"{type(model).__name__}: a layer's output is flattened, and how many columns "
                "each channel owns comes from a forward with them."
            ) from None
    return found


def select(
    model: nn.Module,
    families: list[GroupFamily],
    reasons: dict[str, str],
    granularity: str,
    include: list[str] | None,
    exclude: list[str] | None,
) -> list[GroupFamily]:
    """The families kept by ``include``/``exclude``, refusing patterns naming only non-groups.

    Args:
        model: The model (for the order of the candidates).
        families: The families found.
        reasons: Why each other candidate is not a family.
        granularity: Their granularity (for the messages).
        include: Patterns to keep, or None.
        exclude: Patterns to drop, or None.

    Returns:
        The kept families, in module order.

    Raises:
        ValueError: If a pattern matches no candidate, or an ``include`` pattern matches only
            candidates that are not families.
    """
    by_name = {family.name: family for family in families}
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted(set(by_name) | set(reasons), key=lambda n: position.get(n, -1))
    for option, patterns in (("include", include or []), ("exclude", exclude or [])):
        for pattern in patterns:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise ValueError(
                    f"`{option}` pattern {pattern!r} matches no layer that could have "
                    f"{granularity} groups; candidates: {names}."
                )
            if option == "include" and not any(n in by_name for n in matched):
                name = matched[0]
                raise ValueError(
                    f"`include` names {name!r}, {reasons[name]}; its {granularity}s cannot be "
                    "removed (leave it out, or name only layers that form groups)."
                )
    kept = set(match_names(names, include, exclude))
    return [by_name[name] for name in names if name in kept and name in by_name]


def _rule_covered(model: nn.Module) -> list[tuple[str, nn.Module, type[nn.Module], GroupRule]]:
    """The outermost modules a registered rule covers: ``(fqn, module, class, rule)``."""
    covered: list[tuple[str, nn.Module, type[nn.Module], GroupRule]] = []
    for name, module in model.named_modules():
        if any(_inside(name, fqn) for fqn, *_ in covered):
            continue
        found = rule_for(module)
        if found is not None:
            covered.append((name, module, found[0], found[1]))
    return covered


def _inside(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _candidates(model: nn.Module, granularity: str) -> list[str]:
    """FQNs of the modules that could be producers of ``granularity`` groups."""
    types: tuple[type[nn.Module], ...]
    if granularity == "neuron":
        conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
        types = (nn.Linear,) if not isinstance(conv1d, type) else (nn.Linear, conv1d)
    elif granularity == "channel":
        types = (nn.Conv2d,)
    else:
        types = (nn.MultiheadAttention, PrunedMultiheadAttention)
    return [name for name, module in model.named_modules() if isinstance(module, types)]


def _checked(
    model: nn.Module, families: Any, cls: type[nn.Module], granularity: str
) -> list[GroupFamily]:
    """A rule's families after checking they fit the model."""
    where = f"The group rule for {cls.__name__}"
    if not isinstance(families, list) or not all(isinstance(f, GroupFamily) for f in families):
        raise ValueError(f"{where} must return a list of GroupFamily, got {families!r}.")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for family in families:
        if family.granularity != granularity:
            raise ValueError(
                f"{where} returned {family.name!r} of granularity {family.granularity!r} when "
                f"asked for {granularity!r}."
            )
        check_members(family, tensors, where)
    return families


def check_members(family: GroupFamily, tensors: dict[str, Tensor], where: str) -> None:
    """Check each member names a tensor of the model and indexes within it.

    Args:
        family: The family.
        tensors: The model's parameters and buffers by name.
        where: Who made the family, for the message (``"The group rule for BertLayer"``).

    Raises:
        ValueError: Naming the member that does not fit.
    """
    for member in family.members:
        tensor = tensors.get(member.parameter)
        if tensor is None:
            raise ValueError(
                f"{where}: family {family.name!r} names {member.parameter!r}, which is not a "
                "parameter or buffer of the model."
            )
        if member.dim >= tensor.dim() or (
            int(member.indices.max()) >= tensor.shape[member.dim] or int(member.indices.min()) < 0
        ):
            raise ValueError(
                f"{where}: family {family.name!r} indexes {member.parameter!r} "
                f"{tuple(tensor.shape)} out of range along dim {member.dim}."
            )
