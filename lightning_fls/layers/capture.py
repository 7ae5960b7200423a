"""Module hooks that record layer inputs and output gradients in a step's own forward/backward."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from lightning_fls._validation import check_choice
from lightning_fls.layers.adapters import HookHandle, LayerAdapter

if TYPE_CHECKING:
    from lightning_fls.fishleg.likelihoods import Likelihood
from lightning_fls.layers.gradients import ExampleGradients

LossReduction = Literal["mean", "sum"]


class GradientCapture:
    """Records, for each chosen layer, its inputs and the gradients of its outputs.

    While attached, a forward hook keeps each layer's input (detached) and puts a gradient hook
    on its output, so the training step's **own** backward delivers the output gradients: no
    extra pass. A layer called several times in one forward (weight sharing) is recorded once per
    call. Attach only on steps that need curvature, and detach afterwards; use as a context
    manager to make sure the hooks go.

    Per-example gradients need the gradients of the **per-example** losses. With a batch-mean
    training loss ``(1/B) Σ_b l_b`` (``loss_reduction="mean"``, the default and Lightning's usual
    case) the captured output gradients are multiplied by ``B``; with a summed loss
    (``"sum"``) they are used as they are.

    Args:
        adapters: Layer adapters keyed by the layer's key (its weight's fully-qualified name).
        keep_outputs: Also keep each output with its autograd graph, as
            :meth:`sampled_gradients` needs.

    Example::

        capture = GradientCapture(adapters)
        with capture:
            loss = loss_fn(model(x), y)
            loss.backward()
        grads = capture.example_gradients()   # {key: ExampleGradients}
    """

    def __init__(self, adapters: Mapping[str, LayerAdapter], *, keep_outputs: bool = False) -> None:
        self.adapters = dict(adapters)
        self.keep_outputs = keep_outputs
        self._handles: list[HookHandle] = []
        self._inputs: dict[str, list[Tensor]] = {}
        self._outputs: dict[str, list[Tensor]] = {}
        self._grads: dict[str, dict[int, Tensor]] = {}
        self._record_grads = True
        self.clear()

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently installed."""
        return bool(self._handles)

    def attach(self) -> None:
        """Install the hooks and forget anything recorded before.

        Raises:
            RuntimeError: If the hooks are already installed.
        """
        if self._handles:
            raise RuntimeError("GradientCapture is already attached.")
        self.clear()
        for key, adapter in self.adapters.items():
            self._handles.append(adapter.install_hook(self._forward_hook(key)))

    def detach(self) -> None:
        """Remove the hooks (what was recorded stays available)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget everything recorded."""
        self._inputs = {key: [] for key in self.adapters}
        self._outputs = {key: [] for key in self.adapters}
        self._grads = {key: {} for key in self.adapters}

    def __enter__(self) -> GradientCapture:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.detach()

    def _forward_hook(self, key: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise TypeError(
                    f"GradientCapture needs layer `{key}` to take and return tensors, got "
                    f"{type(args[0]).__name__ if args else 'no input'} -> {type(output).__name__}."
                )
            index = len(self._inputs[key])
            self._inputs[key].append(args[0].detach())
            if self.keep_outputs:
                self._outputs[key].append(output)
            if output.requires_grad:
                output.register_hook(self._grad_hook(key, index))  # type: ignore[no-untyped-call]

        return hook

    def _grad_hook(self, key: str, index: int):  # type: ignore[no-untyped-def]
        def hook(grad: Tensor) -> None:
            if self._record_grads:
                self._grads[key][index] = grad.detach()

        return hook

    def _calls(self, key: str, grads: Mapping[int, Tensor]) -> list[tuple[Tensor, Tensor]]:
        inputs = self._inputs[key]
        if not inputs:
            raise RuntimeError(f"Layer `{key}` was not called in the recorded forward pass.")
        missing = [i for i in range(len(inputs)) if i not in grads]
        if missing:
            raise RuntimeError(
                f"No output gradient was recorded for layer `{key}` (call(s) {missing}): run the "
                "backward while the capture is attached, and make sure the loss depends on it."
            )
        return [(inputs[i], grads[i]) for i in range(len(inputs))]

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> None:
        """Back-propagate ``loss`` to the recorded layer outputs only, and record the gradients.

        Unlike ``loss.backward()`` this touches no parameter's ``.grad``; use it when the
        gradients are wanted for curvature only (e.g. one-shot pruning).

        Args:
            loss: A scalar computed from the recorded forward pass.
            retain_graph: Keep the graph for another backward.

        Raises:
            RuntimeError: If the capture was not created with ``keep_outputs=True``.
        """
        if not self.keep_outputs:
            raise RuntimeError("backward() needs GradientCapture(..., keep_outputs=True).")
        keys = [key for key in self.adapters for _ in self._outputs[key]]
        tensors = [t for key in self.adapters for t in self._outputs[key]]
        self._record_grads = False
        try:
            grads = torch.autograd.grad(loss, tensors, retain_graph=retain_graph, allow_unused=True)
        finally:
            self._record_grads = True
        seen = dict.fromkeys(self.adapters, 0)
        for key, grad in zip(keys, grads, strict=True):
            if grad is not None:
                self._grads[key][seen[key]] = grad.detach()
            seen[key] += 1

    def example_gradients(
        self,
        *,
        loss_reduction: LossReduction = "mean",
        dtype: torch.dtype = torch.float32,
        scale: float = 1.0,
    ) -> dict[str, ExampleGradients]:
        """Per-example gradients of the loss whose backward ran while attached (empirical Fisher).

        Args:
            loss_reduction: ``"mean"`` if that loss was the batch mean of per-example losses,
                ``"sum"`` if it was their sum.
            dtype: Dtype of the returned factors (float32 whatever the model's precision).
            scale: Factor applied to the captured output gradients, to undo a scaling of the
                loss before its backward (gradient accumulation ``1/k``, a mixed-precision loss
                scale ``S``: pass ``k/S``).

        Returns:
            Per-example gradients keyed like the adapters.
        """
        check_choice("loss_reduction", loss_reduction, ("mean", "sum"))
        out: dict[str, ExampleGradients] = {}
        for key, adapter in self.adapters.items():
            calls = self._calls(key, self._grads[key])
            factor = float(scale)
            if loss_reduction == "mean":
                factor *= calls[0][0].shape[0]
            if factor != 1.0:
                calls = [(x, g.to(torch.promote_types(g.dtype, dtype)) * factor) for x, g in calls]
            out[key] = adapter.example_gradients(calls, dtype=dtype)
        return out

    def sampled_gradients(
        self,
        outputs: Tensor,
        likelihood: Likelihood,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, ExampleGradients]:
        """Per-example gradients for targets drawn from the model (true-Fisher estimate).

        Draws ``y ~ p(y | f)`` from ``likelihood`` and back-propagates ``Σ_b l(f_b, y_b)`` to the
        recorded layer outputs only (one extra backward; parameters' ``.grad`` are not touched).
        The graph is retained, so the training step's own backward can still run afterwards.

        Args:
            outputs: The model outputs ``f`` of the recorded forward, with their graph.
            likelihood: The model's predictive distribution.
            generator: Random generator for the draw.
            dtype: Dtype of the returned factors.

        Returns:
            Per-example gradients keyed like the adapters.

        Raises:
            RuntimeError: If the capture was not created with ``keep_outputs=True``, or
                ``outputs`` has no graph.
        """
        if not self.keep_outputs:
            raise RuntimeError("sampled_gradients() needs GradientCapture(..., keep_outputs=True).")
        if not outputs.requires_grad:
            raise RuntimeError(
                "`outputs` has no autograd graph; compute it with gradients enabled."
            )
        targets = likelihood.sample(outputs, generator)
        loss = likelihood.nll(outputs, targets).sum()
        keys = [key for key in self.adapters for _ in self._outputs[key]]
        tensors = [t for key in self.adapters for t in self._outputs[key]]
        self._record_grads = False
        try:
            grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        finally:
            self._record_grads = True
        per_key: dict[str, dict[int, Tensor]] = {key: {} for key in self.adapters}
        seen = dict.fromkeys(self.adapters, 0)
        for key, grad in zip(keys, grads, strict=True):
            if grad is not None:  # a missing one is reported by _calls
                per_key[key][seen[key]] = grad
            seen[key] += 1
        out: dict[str, ExampleGradients] = {}
        for key, adapter in self.adapters.items():
            out[key] = adapter.example_gradients(self._calls(key, per_key[key]), dtype=dtype)
        return out
