"""Coupled groups of plain models, found in the graph ``torch.fx.symbolic_trace`` records.

From each producer's call, the walk follows the values that still carry its units on one axis:

* ``"last"``: units along the last dimension (a Linear's output), through elementwise
  operations (activation modules and functions, dropout, arithmetic with constants, products
  and sums of values carrying the same units), until Linear layers read them;
* ``"channel"``: units along dimension 1 of ``[N, C, H, W]`` (a Conv2d's output), also through
  BatchNorm2d (a passive member), pooling and ``Dropout2d``, until Conv2d layers (``groups=1``)
  read them, or a flatten of ``[N, C, H, W]`` to ``[N, C·H·W]`` turns them into
* ``"flat"``: unit ``c`` owns the ``H·W`` consecutive columns ``c·H·W … (c+1)·H·W − 1``, read
  by Linear layers. ``H·W`` comes from the shapes of a forward with the example inputs.

Anything else the walk meets (the model output, a residual add, a concat, a reshape other than
that flatten, an operation it does not know, a layer called twice) means the producer's units
cannot be removed; the reason is recorded.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_fls.structured.groups import GroupFamily, GroupMember, unit_indices

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Dropout,
    nn.AlphaDropout,
    nn.Identity,
)
"""Modules acting on each entry alone (any layout)."""

_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
"""Modules acting on each channel of ``[N, C, H, W]`` alone."""

_ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.abs,
        torch.neg,
        torch.square,
        torch.clamp,
        torch.clip,
        torch.pow,
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.gelu,
        F.silu,
        F.sigmoid,
        F.tanh,
        F.elu,
        F.selu,
        F.celu,
        F.mish,
        F.hardtanh,
        F.hardswish,
        F.hardsigmoid,
        F.softplus,
        F.dropout,
        F.alpha_dropout,
        operator.neg,
        operator.pow,
    }
)

_SUMS: frozenset[Any] = frozenset({operator.add, operator.iadd, operator.sub, torch.add, torch.sub})
_PRODUCTS: frozenset[Any] = frozenset(
    {operator.mul, operator.imul, operator.truediv, torch.mul, torch.div}
)
_CONCATS: frozenset[Any] = frozenset({torch.cat, torch.concat, torch.stack})

_ELEMENTWISE_METHODS = frozenset(
    {
        "relu",
        "relu_",
        "sigmoid",
        "tanh",
        "exp",
        "abs",
        "neg",
        "clamp",
        "clip",
        "pow",
        "clone",
        "contiguous",
        "add",
        "sub",
        "mul",
        "div",
    }
)
_METADATA_METHODS = frozenset({"size", "dim"})
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
_RESHAPE_METHODS = frozenset({"view", "reshape"})


class NotAGroupError(Exception):
    """A producer's units cannot be removed; the message completes "``'fc2'``, ..."."""


class NeedsShapesError(Exception):
    """The walk met a flatten and the graph has no shapes (no example inputs were given)."""


@dataclass(frozen=True)
class _Layout:
    """Where a value carries the producer's units (see the module docstring)."""

    kind: str  # "last", "channel" or "flat"
    span: int = 1


def trace(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx``; record shapes with one forward if inputs are given.

    Args:
        model: The model; it is not modified.
        example_inputs: None, a tensor, or a tuple of the forward's positional arguments.

    Returns:
        The graph module (sharing the model's submodules), its nodes holding
        ``meta["tensor_meta"]`` when ``example_inputs`` is given (recorded in eval mode, so
        the model's state, BatchNorm statistics included, is unchanged).

    Raises:
        ValueError: If tracing fails (naming the model class and suggesting a group rule), or
            the forward with ``example_inputs`` fails.
    """
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception as error:
        raise ValueError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}). "
            "Register a group rule for it, or for the blocks holding the layers to prune, with "
            "`lightning_fls.register_group_rule(module_type, rule)`."
        ) from error
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        # The graph module shares the model's submodules: run it in eval mode so that BatchNorm
        # running statistics are not updated (and dropout draws no random numbers).
        modes = {module: module.training for module in graph_module.modules()}
        try:
            graph_module.eval()
            with torch.no_grad():
                ShapeProp(graph_module).propagate(*args)
        except Exception as error:
            raise ValueError(
                f"`example_inputs` do not run through {type(model).__name__}: "
                f"{type(error).__name__}: {error}"
            ) from error
        finally:
            for module, training in modes.items():
                module.training = training
    return graph_module


def traced_families(
    model: nn.Module, graph_module: fx.GraphModule, granularity: str
) -> tuple[list[GroupFamily], dict[str, str]]:
    """The families of one granularity, and why every other candidate layer is not one.

    Args:
        model: The traced model.
        graph_module: From :func:`trace`.
        granularity: ``"neuron"`` (Linear producers), ``"channel"`` (Conv2d producers) or
            ``"head"`` (never found by tracing).

    Returns:
        ``(families, reasons)``: families in module order; ``reasons`` maps each candidate
        module's FQN that is not a family to a clause such as ``"whose output reaches the model
        output"``.

    Raises:
        NeedsShapesError: If a producer's output is flattened and the graph has no shapes.
    """
    modules = dict(model.named_modules())  # the graph module holds only the called ones
    calls: dict[str, list[fx.Node]] = {}
    read_directly: set[str] = set()
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
        elif node.op == "get_attr":
            read_directly.add(str(node.target).rpartition(".")[0])
    families: list[GroupFamily] = []
    reasons: dict[str, str] = {}
    if granularity == "head":
        for name, module in modules.items():
            if isinstance(module, nn.MultiheadAttention):
                reasons[name] = (
                    "whose heads are found only through group rules (nn.TransformerEncoderLayer "
                    "has one; register one for the module holding it)"
                )
        return families, reasons
    producer_type = nn.Linear if granularity == "neuron" else nn.Conv2d
    context = _Context(modules, calls, read_directly)
    for name, module in modules.items():
        if not isinstance(module, producer_type):
            continue
        try:
            families.append(context.family(name, module, granularity))
        except NotAGroupError as why:
            reasons[name] = str(why)
    return families, reasons


@dataclass
class _Context:
    """What the walk needs to know about the graph."""

    modules: dict[str, nn.Module]
    calls: dict[str, list[fx.Node]]
    read_directly: set[str]

    def _called_once(self, name: str, what: str) -> fx.Node:
        nodes = self.calls.get(name, [])
        if not nodes:
            parent = name
            while parent:
                parent = parent.rpartition(".")[0]
                if parent in self.calls:  # called as a whole: fx did not trace into it
                    kind = type(self.modules[parent]).__name__
                    raise NotAGroupError(
                        f"{what} runs inside {kind} {parent!r}, which torch.fx does not trace "
                        f"into (register a group rule for {kind})"
                    )
            raise NotAGroupError(f"{what} the forward never calls")
        if len(nodes) > 1:
            raise NotAGroupError(f"{what} the forward calls {len(nodes)} times")
        if name in self.read_directly:
            raise NotAGroupError(f"{what} has parameters the forward also reads directly")
        return nodes[0]

    def family(self, name: str, module: nn.Module, granularity: str) -> GroupFamily:
        """The family of producer ``name``, or :class:`NotAGroupError` saying why there is none."""
        start = self._called_once(name, "which")
        if isinstance(module, nn.Conv2d):
            units = module.out_channels
            if module.groups != 1:
                raise NotAGroupError(
                    f"which has groups={module.groups} (only groups=1 is supported)"
                )
            layout = _Layout("channel")
        else:
            units = int(module.get_parameter("weight").shape[0])
            layout = _Layout("last")
        consumers, passives = self._walk(start, layout, units)
        if not consumers:
            raise NotAGroupError("whose output no layer reads")
        index = unit_indices(units)
        members = [GroupMember(f"{name}.weight", 0, index, "producer")]
        if getattr(module, "bias", None) is not None:
            members.append(GroupMember(f"{name}.bias", 0, index, "producer"))
        for passive in passives:
            norm = self.modules[passive]
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                if getattr(norm, tensor, None) is not None:
                    members.append(GroupMember(f"{passive}.{tensor}", 0, index, "passive"))
        for consumer, seen_as in consumers.items():
            columns = unit_indices(units, seen_as.span)
            members.append(GroupMember(f"{consumer}.weight", 1, columns, "consumer"))
        return GroupFamily(name, granularity, units, tuple(members))

    def _walk(
        self, start: fx.Node, layout: _Layout, units: int
    ) -> tuple[dict[str, _Layout], list[str]]:
        """Follow the producer's units from ``start``: its consumers and passive modules."""
        seen: dict[fx.Node, _Layout] = {start: layout}
        pending = deque([start])  # breadth first: the message names the nearest offending op
        downstream = _downstream(start)
        joins: list[fx.Node] = []  # elementwise nodes that may have other tensor inputs
        consumers: dict[str, _Layout] = {}
        passives: list[str] = []
        while pending:
            node = pending.popleft()
            for user in node.users:
                result = self._step(user, node, seen[node], units, consumers, passives)
                if result is None:
                    continue
                if user in seen:
                    if seen[user] != result:
                        raise NotAGroupError(
                            f"whose output reaches {_describe(user)} in two layouts"
                        )
                    continue
                seen[user] = result
                pending.append(user)
                if _elementwise(user):
                    if any(other not in downstream for other in user.all_input_nodes):
                        raise _combined(user)
                    joins.append(user)
        for join in joins:
            if any(other not in seen for other in join.all_input_nodes):
                raise _combined(join)
        return consumers, passives

    def _step(
        self,
        user: fx.Node,
        node: fx.Node,
        layout: _Layout,
        units: int,
        consumers: dict[str, _Layout],
        passives: list[str],
    ) -> _Layout | None:
        """What ``user`` does with the units ``node`` carries.

        Returns:
            The layout of ``user``'s output to follow, or None when it absorbs the units (a
            consumer, a read of the shape).
        """
        if user.op == "output":
            raise NotAGroupError("whose output reaches the model output")
        if user.op == "call_module":
            return self._module_step(user, node, layout, units, consumers, passives)
        target = user.target
        if user.op == "call_method" and target in _METADATA_METHODS:
            return None
        if target is getattr and len(user.args) > 1 and user.args[1] in _METADATA_ATTRIBUTES:
            return None
        if target in _CONCATS:
            raise NotAGroupError(f"whose output reaches a concat ({_describe(user)})")
        if _elementwise(user):
            return layout
        if target is F.adaptive_avg_pool2d and layout.kind == "channel" and _first(user, node):
            return layout
        if target is torch.flatten or (user.op == "call_method" and target == "flatten"):
            start = _argument(user, 1, "start_dim", 0)
            end = _argument(user, 2, "end_dim", -1)
            return _flatten(user, node, layout, start, end)
        if target is torch.reshape or (user.op == "call_method" and target in _RESHAPE_METHODS):
            return _reshape(user, node, layout)
        if user.op == "call_method" and target in ("permute", "transpose", "unflatten", "split"):
            raise NotAGroupError(
                f"whose output reaches a reshape other than flatten ({_describe(user)})"
            )
        raise NotAGroupError(
            f"whose output reaches {_describe(user)}, which structured pruning does not understand"
        )

    def _module_step(
        self,
        user: fx.Node,
        node: fx.Node,
        layout: _Layout,
        units: int,
        consumers: dict[str, _Layout],
        passives: list[str],
    ) -> _Layout | None:
        name = str(user.target)
        module = self.modules[name]
        kind = type(module).__name__
        if not _first(user, node):
            raise NotAGroupError(f"whose output reaches {kind} {name!r} other than as its input")
        if isinstance(module, _ELEMENTWISE_MODULES):
            return layout
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return layout
        if isinstance(module, _CHANNEL_MODULES) and layout.kind == "channel":
            if getattr(module, "return_indices", False):
                raise NotAGroupError(
                    f"whose output reaches {kind} {name!r} with return_indices=True"
                )
            return layout
        if isinstance(module, nn.Flatten):
            return _flatten(user, node, layout, module.start_dim, module.end_dim)
        what = f"whose output reaches {kind} {name!r}, which"
        if isinstance(module, nn.BatchNorm2d) and layout.kind == "channel":
            self._called_once(name, what)
            if module.num_features != units:
                raise NotAGroupError(f"{what} has {module.num_features} features")
            passives.append(name)
            return layout
        if isinstance(module, nn.Linear) and layout.kind in ("last", "flat"):
            self._called_once(name, what)
            if module.in_features != units * layout.span:
                raise NotAGroupError(
                    f"{what} reads {module.in_features} features, not {units * layout.span}"
                )
            consumers[name] = layout
            return None
        if isinstance(module, nn.Conv2d) and layout.kind == "channel":
            self._called_once(name, what)
            if module.groups != 1 or module.in_channels != units:
                raise NotAGroupError(
                    f"{what} has groups={module.groups} and {module.in_channels} input channels"
                )
            consumers[name] = layout
            return None
        raise NotAGroupError(
            f"whose output reaches {kind} {name!r}, which structured pruning does not understand "
            f"there"
        )


def _describe(node: fx.Node) -> str:
    """``"`add`"``, ``"`torch.cat`"`` or ``"`.view`"`` for the error messages."""
    if node.op == "call_method":
        return f"`.{node.target}`"
    if node.op == "call_module":
        return f"module {node.target!r}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    return f"`{name}`" if module in ("_operator", "operator", "builtins") else f"`{module}.{name}`"


def _downstream(start: fx.Node) -> set[fx.Node]:
    """``start`` and every node computed from it."""
    found = {start}
    pending = [start]
    while pending:
        for user in pending.pop().users:
            if user not in found:
                found.add(user)
                pending.append(user)
    return found


def _combined(join: fx.Node) -> NotAGroupError:
    """The error for an elementwise ``join`` of the units with a tensor that does not carry them."""
    if join.target in _SUMS or join.target in ("add", "sub"):
        return NotAGroupError(f"whose output reaches a residual add ({_describe(join)})")
    return NotAGroupError(f"whose output is combined with another tensor in {_describe(join)}")


def _elementwise(node: fx.Node) -> bool:
    """Whether ``node`` acts on each entry alone (inputs may broadcast)."""
    target = node.target
    if node.op == "call_method":
        return target in _ELEMENTWISE_METHODS
    return node.op == "call_function" and (
        target in _ELEMENTWISE_FUNCTIONS or target in _SUMS or target in _PRODUCTS
    )


def _first(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``node`` is ``user``'s first positional argument and its only node input."""
    return bool(user.args) and user.args[0] is node and user.all_input_nodes == [node]


def _argument(node: fx.Node, position: int, keyword: str, default: int) -> int:
    """An integer argument of ``node`` given by position or keyword (``default`` if absent)."""
    value = node.args[position] if len(node.args) > position else node.kwargs.get(keyword, default)
    if not isinstance(value, int):
        raise NotAGroupError(f"whose output reaches {_describe(node)} with a computed dimension")
    return value


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _channel_shape(user: fx.Node, node: fx.Node, layout: _Layout) -> tuple[int, ...]:
    """The ``[N, C, H, W]`` shape of ``node`` that ``user`` reshapes; checks the layout."""
    if layout.kind != "channel" or not user.args or user.args[0] is not node:
        raise NotAGroupError(
            f"whose output reaches a reshape other than flatten ({_describe(user)})"
        )
    shape = _shape(node)
    if shape is None:
        raise NeedsShapesError
    if len(shape) != 4:
        raise NotAGroupError(
            f"whose output is flattened from {len(shape)} dimensions, not [N, C, H, W]"
        )
    return shape


def _flatten(user: fx.Node, node: fx.Node, layout: _Layout, start: int, end: int) -> _Layout:
    shape = _channel_shape(user, node, layout)
    if (start % 4, end % 4) != (1, 3):
        raise NotAGroupError(
            f"whose output reaches a flatten of dimensions {start}..{end} ({_describe(user)}), "
            "not of [C, H, W]"
        )
    return _Layout("flat", shape[2] * shape[3])


def _reshape(user: fx.Node, node: fx.Node, layout: _Layout) -> _Layout:
    shape = _channel_shape(user, node, layout)
    out = _shape(user)
    if out != (shape[0], math.prod(shape[1:])):
        raise NotAGroupError(
            f"whose output reaches a reshape other than flatten ({_describe(user)})"
        )
    return _Layout("flat", shape[2] * shape[3])
