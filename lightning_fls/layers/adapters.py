"""Layer adapters: how a module type is seen as a canonical matrix, and its per-example gradients.

An adapter never changes the module. It knows

* the canonical shape ``(d_out, d_in')`` and how the module's parameters map to and from the
  canonical matrix (weight flattened to ``[d_out, d_in]``, bias appended as the last column);
* how to rebuild per-example gradients from what module hooks capture in the training step's
  own forward and backward: the module's input and the gradient of its output.

Adding support for a new layer type means writing one adapter and registering it with
:func:`~lightning_fls.register_layer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_fls.layers.gradients import DenseGradients, ExampleGradients, OuterProductGradients

Call = tuple[Tensor, Tensor]
"""One recorded call of a module: ``(input, gradient of the output)``."""

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], None]
"""A forward hook ``hook(module, args, output)``, as ``nn.Module.register_forward_hook`` takes."""


class HookHandle(Protocol):
    """Anything that removes an installed hook."""

    def remove(self) -> None:
        """Remove the hook."""
        ...


class LayerAdapter(ABC):
    """Canonical view of one module's parameters and per-example gradients.

    Args:
        module: The module; it is read, never modified.

    Raises:
        TypeError: If ``module`` is not an instance of :attr:`module_type`.
    """

    module_type: ClassVar[type[nn.Module]]
    """The module class this adapter understands (subclasses are accepted too)."""

    key_parameter: ClassVar[str] = "weight"
    """Name of the parameter whose fully-qualified name keys this layer's state."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, self.module_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.module_type.__name__}, "
                f"got {type(module).__name__}."
            )
        self.module = module

    @property
    @abstractmethod
    def canonical_shape(self) -> tuple[int, int]:
        """Canonical shape ``(d_out, d_in')``."""

    @property
    @abstractmethod
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the module parameters covered by the canonical matrix, in order."""

    @abstractmethod
    def to_canonical(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Assemble parameter-shaped tensors into the canonical matrix.

        Args:
            tensors: One tensor per name in :attr:`parameter_names`, shaped like that parameter,
                optionally with the same leading batch dimensions on all of them.

        Returns:
            Tensor of shape ``[..., d_out, d_in']``.
        """

    @abstractmethod
    def from_canonical(self, matrix: Tensor) -> dict[str, Tensor]:
        """Split a canonical matrix into parameter-shaped tensors.

        Args:
            matrix: Tensor of shape ``[d_out, d_in']``.

        Returns:
            One tensor per name in :attr:`parameter_names`.
        """

    @abstractmethod
    def example_gradients(
        self, calls: Sequence[Call], *, dtype: torch.dtype = torch.float32
    ) -> ExampleGradients:
        """Per-example gradients from the module's recorded calls of one forward/backward.

        Args:
            calls: ``(input, output_grad)`` for every call of the module in the forward pass (a
                shared module is called more than once; its gradient is the sum over calls).
                ``output_grad`` must already be the gradient of the per-example losses.
            dtype: Dtype of the returned factors.

        Returns:
            The per-example gradients in canonical layout.
        """

    def install_hook(self, hook: ForwardHook) -> HookHandle:
        """Have ``hook(module, (input,), output)`` called for every call of the layer.

        ``input`` is the layer's input with the batch first and ``output`` its output, whose
        gradient the capture records. The default is a forward hook on the module; layers
        whose computation is not a plain module call (attention) override this.

        Args:
            hook: The hook.

        Returns:
            A handle whose ``remove()`` uninstalls it.
        """
        return self.module.register_forward_hook(hook)

    def check_supported(self) -> None:
        """Raise ``ValueError`` if this particular module cannot be pruned (default: never)."""
        return

    def canonical_weight(self) -> Tensor:
        """The module's current parameters as one canonical matrix (detached).

        Returns:
            Tensor of shape ``[d_out, d_in']``.
        """
        return self.to_canonical(
            {n: getattr(self.module, n).detach() for n in self.parameter_names}
        )

    @torch.no_grad()
    def set_canonical_weight(self, matrix: Tensor) -> None:
        """Write a canonical matrix ``[d_out, d_in']`` into the module's parameters in place.

        The inverse of :meth:`canonical_weight`.
        """
        for name, value in self.from_canonical(matrix).items():
            getattr(self.module, name).copy_(value)

    def canonical_positions(self, name: str) -> Tensor:
        """Where each entry of one of the layer's parameters lies in the canonical matrix.

        Args:
            name: The parameter's attribute name (one of :attr:`parameter_names`).

        Returns:
            int64, shaped like the parameter: each entry's flat (row-major) position in
            ``[d_out, d_in']``.
        """
        shapes = {n: getattr(self.module, n).shape for n in self.parameter_names}
        parts = {n: torch.zeros(shape, dtype=torch.float64) for n, shape in shapes.items()}
        size = shapes[name].numel()
        parts[name] = torch.arange(1, size + 1, dtype=torch.float64).reshape(shapes[name])
        canonical = self.to_canonical(parts).reshape(-1)  # entry number + 1, 0 elsewhere
        located = canonical.nonzero().squeeze(-1)
        where = torch.empty(size, dtype=torch.long)
        where[canonical[located].long() - 1] = located
        return where.reshape(shapes[name])

    def canonical_grad(self) -> Tensor:
        """The module's current ``.grad`` as one canonical matrix.

        Returns:
            Tensor of shape ``[d_out, d_in']``.

        Raises:
            RuntimeError: If a parameter has no gradient.
        """
        grads = {}
        for name in self.parameter_names:
            grad = getattr(self.module, name).grad
            if grad is None:
                raise RuntimeError(f"Parameter `{name}` of {self.module!r} has no gradient.")
            grads[name] = grad
        return self.to_canonical(grads)


class OuterProductAdapter(LayerAdapter):
    """Adapter for layers whose per-example gradient is ``Σ_t g_t a_tᵀ`` (Linear, Conv2d).

    Subclasses implement :meth:`factors`; the bias, if any, is the last input column of ones.
    """

    bias_parameter: ClassVar[str] = "bias"
    """Name of the bias parameter (the last canonical column), if the module has one."""

    @property
    def weight(self) -> Tensor:
        """The module's weight parameter."""
        weight = getattr(self.module, self.key_parameter, None)
        if not isinstance(weight, Tensor):
            raise TypeError(f"{self.module!r} has no {self.key_parameter} tensor.")
        return weight

    @property
    def has_bias(self) -> bool:
        """Whether the module has a bias (the last canonical column)."""
        return getattr(self.module, self.bias_parameter, None) is not None

    @override
    @property
    def parameter_names(self) -> tuple[str, ...]:
        if self.has_bias:
            return (self.key_parameter, self.bias_parameter)
        return (self.key_parameter,)

    @abstractmethod
    def factors(self, inputs: Tensor, output_grads: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs ``a`` and output gradients ``g`` of one call in ``[B, T, K, ·]`` layout.

        Args:
            inputs: The module's input as recorded by a forward hook.
            output_grads: The gradient of the module's output.

        Returns:
            ``a`` of shape ``[B, T, K, d_in]`` (no bias column) and ``g`` of shape
            ``[B, T, K, d_out / K]``.
        """

    def input_factor(self, inputs: Tensor) -> Tensor:
        """The inputs ``a`` of :meth:`factors` alone, ``[B, T, K, d_in]`` (no bias column).

        Needed only by forward-only calibration (SparseGPT, Wanda); an adapter that does not
        implement it works with every method that reads gradients.

        Args:
            inputs: The module's input as recorded by a forward hook.

        Raises:
            NotImplementedError: If the adapter does not implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement input_factor(), which forward-only "
            "calibration (methods that read layer inputs) needs."
        )

    @override
    def example_gradients(
        self, calls: Sequence[Call], *, dtype: torch.dtype = torch.float32
    ) -> OuterProductGradients:
        if not calls:
            raise ValueError("`calls` is empty: the module was not called in the forward pass.")
        inputs, grads = [], []
        for x, gy in calls:
            a, g = self.factors(x.detach().to(dtype), gy.detach().to(dtype))
            if self.has_bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            inputs.append(a)
            grads.append(g)
        if len(calls) == 1:
            return OuterProductGradients(inputs[0], grads[0])
        return OuterProductGradients(torch.cat(inputs, dim=1), torch.cat(grads, dim=1))


class LinearAdapter(OuterProductAdapter):
    """``nn.Linear``: canonical ``[d_out, d_in (+1)]`` = ``[W | b]``.

    Inputs may carry middle dimensions (``[B, ..., d_in]``, e.g. tokens): each example's
    gradient then sums over them.
    """

    module_type: ClassVar[type[nn.Module]] = nn.Linear

    @override
    @property
    def canonical_shape(self) -> tuple[int, int]:
        weight = self.weight
        return (int(weight.shape[0]), int(weight.shape[1]) + int(self.has_bias))

    @override
    def to_canonical(self, tensors: Mapping[str, Tensor]) -> Tensor:
        weight = tensors[self.key_parameter]
        if not self.has_bias:
            return weight
        return torch.cat([weight, tensors[self.bias_parameter].unsqueeze(-1)], dim=-1)

    @override
    def from_canonical(self, matrix: Tensor) -> dict[str, Tensor]:
        if not self.has_bias:
            return {self.key_parameter: matrix}
        return {self.key_parameter: matrix[..., :-1], self.bias_parameter: matrix[..., -1]}

    @override
    def input_factor(self, inputs: Tensor) -> Tensor:
        if inputs.dim() < 2:
            raise ValueError(
                f"Linear input must have a batch dimension, got shape {tuple(inputs.shape)}."
            )
        return inputs.reshape(inputs.shape[0], -1, 1, inputs.shape[-1])

    @override
    def factors(self, inputs: Tensor, output_grads: Tensor) -> tuple[Tensor, Tensor]:
        a = self.input_factor(inputs)
        g = output_grads.reshape(a.shape[0], -1, 1, output_grads.shape[-1])
        return a, g


class Conv2dAdapter(OuterProductAdapter):
    """``nn.Conv2d``: canonical ``[c_out, c_in/groups · kh · kw (+1)]``, the flattened kernel.

    Any stride, padding (including ``"same"``/``"valid"`` and non-zero padding modes),
    dilation and groups. Per-example gradients come from the unfolded input patches
    (``F.unfold``), summed over output positions; with ``groups = K`` each group's rows see only
    that group's input channels.
    """

    module_type: ClassVar[type[nn.Module]] = nn.Conv2d

    @override
    @property
    def canonical_shape(self) -> tuple[int, int]:
        weight = self.weight
        fan_in = int(weight.shape[1] * weight.shape[2] * weight.shape[3])
        return (int(weight.shape[0]), fan_in + int(self.has_bias))

    @override
    def to_canonical(self, tensors: Mapping[str, Tensor]) -> Tensor:
        weight = tensors["weight"].flatten(-3)
        if not self.has_bias:
            return weight
        return torch.cat([weight, tensors["bias"].unsqueeze(-1)], dim=-1)

    @override
    def from_canonical(self, matrix: Tensor) -> dict[str, Tensor]:
        shape = self.weight.shape
        weight = matrix[..., : shape[1] * shape[2] * shape[3]]
        out = {"weight": weight.reshape(*matrix.shape[:-2], *shape)}
        if self.has_bias:
            out["bias"] = matrix[..., -1]
        return out

    def _explicit_padding(self) -> tuple[int, int, int, int] | None:
        """Padding as ``F.pad`` wants it (w_left, w_right, h_left, h_right), or None if none."""
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        if conv.padding == "valid":
            return None
        if conv.padding == "same":
            pads: list[int] = []
            for dim in (1, 0):
                total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
                pads += [total // 2, total - total // 2]
            return (pads[0], pads[1], pads[2], pads[3])
        ph, pw = cast(tuple[int, int], conv.padding)
        if ph == pw == 0:
            return None
        return (int(pw), int(pw), int(ph), int(ph))

    @override
    def input_factor(self, inputs: Tensor) -> Tensor:
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        if inputs.dim() != 4:
            raise ValueError(
                f"Conv2d input must be batched [B, C, H, W], got shape {tuple(inputs.shape)}."
            )
        pad = self._explicit_padding()
        if pad is not None:
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            inputs = F.pad(inputs, pad, mode=mode)
        patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        batch, _, positions = patches.shape
        return patches.reshape(batch, conv.groups, -1, positions).permute(0, 3, 1, 2)

    @override
    def factors(self, inputs: Tensor, output_grads: Tensor) -> tuple[Tensor, Tensor]:
        a = self.input_factor(inputs)
        batch, positions, groups = a.shape[0], a.shape[1], a.shape[2]
        g = output_grads.reshape(batch, groups, -1, positions).permute(0, 3, 1, 2)
        return a, g


class GenericAdapter(LayerAdapter):
    """Any module with parameters of its own: canonical ``[1, n]``, all its direct parameters.

    The fallback for layers without a dedicated adapter (norms, embeddings, custom layers), meant
    for the diagonal structure. Per-example gradients are computed with ``torch.func`` from the
    recorded input and output gradient: one vectorised vector–Jacobian product of the module per
    call, and an explicit ``[B, 1, n]`` gradient tensor, so it suits small parameter counts.
    The module must map one tensor to one tensor and treat examples independently (batch norm in
    training mode does not, and is refused).
    """

    module_type: ClassVar[type[nn.Module]] = nn.Module

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        names = tuple(name for name, _ in module.named_parameters(recurse=False))
        if not names:
            raise ValueError(f"{type(module).__name__} has no parameters of its own.")
        self._names = names

    @property
    def key_parameter(self) -> str:  # type: ignore[override]
        """The first of the module's own parameters."""
        return self._names[0]

    @override
    @property
    def parameter_names(self) -> tuple[str, ...]:
        return self._names

    @override
    @property
    def canonical_shape(self) -> tuple[int, int]:
        return (1, sum(getattr(self.module, n).numel() for n in self._names))

    @override
    def to_canonical(self, tensors: Mapping[str, Tensor]) -> Tensor:
        shapes = {n: getattr(self.module, n).shape for n in self._names}
        first = tensors[self._names[0]]
        lead = first.shape[: first.dim() - len(shapes[self._names[0]])]
        flat = [tensors[n].reshape(*lead, -1) for n in self._names]
        return torch.cat(flat, dim=-1).unsqueeze(-2)

    @override
    def from_canonical(self, matrix: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        flat = matrix[..., 0, :]
        for name in self._names:
            shape = getattr(self.module, name).shape
            size = getattr(self.module, name).numel()
            out[name] = flat[..., start : start + size].reshape(*flat.shape[:-1], *shape)
            start += size
        return out

    @override
    def example_gradients(
        self, calls: Sequence[Call], *, dtype: torch.dtype = torch.float32
    ) -> ExampleGradients:
        from torch.func import functional_call, vjp, vmap

        if isinstance(self.module, nn.modules.batchnorm._BatchNorm) and self.module.training:
            raise ValueError(
                "Per-example gradients of batch norm in training mode are not defined (the batch "
                "statistics couple the examples); exclude it or put it in eval mode."
            )
        if not calls:
            raise ValueError("`calls` is empty: the module was not called in the forward pass.")
        params = {n: getattr(self.module, n).detach() for n in self._names}

        def one(x: Tensor, g: Tensor) -> dict[str, Tensor]:
            def f(p: dict[str, Tensor]) -> Tensor:
                out: Tensor = functional_call(self.module, p, (x.unsqueeze(0),))
                return out

            pullback = vjp(f, params)[1]
            grads: dict[str, Tensor] = pullback(g.unsqueeze(0))[0]
            return grads

        total: Tensor | None = None
        for x, g in calls:
            per_example = vmap(one)(x.detach(), g.detach())
            canonical = self.to_canonical(per_example).to(dtype)
            total = canonical if total is None else total + canonical
        assert total is not None
        return DenseGradients(total)


class TransposedLinearAdapter(LinearAdapter):
    """A Linear layer that stores its weight transposed, ``[d_in, d_out]``: ``y = x W + b``.

    Hugging Face's GPT-2-style ``Conv1D`` is one (registered automatically once
    ``transformers`` is imported, :func:`~lightning_fls.layers.registry.adapter_for`).
    Canonical ``[d_out, d_in (+1)]`` = ``[Wᵀ | b]``: pruned exactly like ``nn.Linear``.
    """

    module_type: ClassVar[type[nn.Module]] = nn.Module

    @override
    @property
    def canonical_shape(self) -> tuple[int, int]:
        weight = self.weight
        return (int(weight.shape[1]), int(weight.shape[0]) + int(self.has_bias))

    @override
    def to_canonical(self, tensors: Mapping[str, Tensor]) -> Tensor:
        key = self.key_parameter
        return super().to_canonical({**tensors, key: tensors[key].transpose(-1, -2)})

    @override
    def from_canonical(self, matrix: Tensor) -> dict[str, Tensor]:
        parts = super().from_canonical(matrix)
        parts[self.key_parameter] = parts[self.key_parameter].transpose(-1, -2)
        return parts
