"""Calibration data of one recomputation step, and the collectors that gather it batch by batch.

A pruning method declares what calibration it needs (:attr:`PruningMethod.calibration
<lightning_fls.methods.PruningMethod.calibration>`):

* ``"none"``: nothing (magnitude pruning reads only the weights);
* ``"inputs"``: each layer's input second moment ``H = Σ x xᵀ``, streamed forward-only by
  :class:`InputCollector` (no backward, nothing stored but the ``d_in' × d_in'`` sums);
* ``"gradients"``: per-example gradients (:class:`~lightning_fls.layers.ExampleGradients`),
  recorded by :class:`GradientCollector` from one forward/backward per batch.

A collector sees one batch at a time (:meth:`Collector.observe`) and hands the step's
:class:`StepData` over at the end (:meth:`Collector.result`); a collector that keeps running
sums instead of per-batch records only has to change what ``observe`` stores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from lightning_fls.batches import Batch, LossFn, output_tensor
from lightning_fls.fishleg import Likelihood
from lightning_fls.layers import ExampleGradients, GradientCapture, LayerAdapter
from lightning_fls.layers.adapters import OuterProductAdapter
from lightning_fls.layers.gradients import OuterProductGradients
from lightning_fls.sparsegpt import input_hessian

Calibration = Literal["none", "inputs", "gradients"]
"""What a method reads from the calibration data (see the module docstring)."""


class GradientStream(Protocol):
    """A method's running statistics, folded batch by batch.

    Returned by :meth:`PruningMethod.stream <lightning_fls.methods.PruningMethod.stream>`: the
    collector then keeps no per-example record.
    """

    def update(self, gradients: Mapping[str, ExampleGradients]) -> None:
        """Fold one batch's per-example gradients (by weight name) into the statistics."""


@dataclass
class StepData:
    """Calibration data of one recomputation step.

    Attributes:
        batches: Per-example gradients by weight name, one dict per batch (``"gradients"``,
            when the method does not stream).
        samples: Examples seen in the step.
        input_hessians: ``H = Σ x xᵀ`` (float64 ``[d_in', d_in']``, the bias column of ones
            included) by weight name, over the step's examples (``"inputs"``); None otherwise.
        statistics: The method's :class:`GradientStream` after every batch (streaming
            methods), instead of ``batches``.
        traces: ``Σ_b ‖G_b‖²`` over the step's examples by weight name (streamed steps: the
            Fisher's trace, for the relative damping); None otherwise.
    """

    batches: list[dict[str, ExampleGradients]] = field(default_factory=list)
    samples: int = 0
    input_hessians: dict[str, Tensor] | None = None
    statistics: GradientStream | None = None
    traces: dict[str, float] | None = None


class Collector(ABC):
    """Runs calibration batches through the model and keeps what one method needs.

    Args:
        model: The model (in eval mode; the pruned layers' parameters require grad).
        loss_fn: ``loss_fn(outputs, targets)`` (or ``(outputs, batch)`` for dict batches), a
            scalar batch mean; None: the model's own ``outputs.loss``
            (:class:`~lightning_fls.batches.Batch`).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.samples = 0

    @abstractmethod
    def observe(self, batch: Batch) -> int:
        """Run one batch and record it (padding, where the batch marks it, left out).

        Args:
            batch: The batch.

        Returns:
            The batch size.
        """

    @abstractmethod
    def result(self) -> StepData:
        """The step's data (call once, after the last :meth:`observe`)."""


class GradientCollector(Collector):
    """Per-example gradients of the mean loss (or of sampled labels: the true Fisher).

    Args:
        model: The model.
        loss_fn: The loss.
        layers: Adapters of the pruned layers, by weight name.
        likelihood: For the sampled Fisher: labels are drawn from the model's predictive
            distribution; None for the empirical Fisher (data labels).
        generator: Random generator of the sampled labels.
        stream: The method's running statistics: each batch is folded into them (and the
            Fisher's trace summed) instead of being kept.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        layers: Mapping[str, LayerAdapter],
        *,
        likelihood: Likelihood | None = None,
        generator: torch.Generator | None = None,
        stream: GradientStream | None = None,
    ) -> None:
        super().__init__(model, loss_fn)
        self.capture = GradientCapture(layers, keep_outputs=True)
        self.likelihood = likelihood
        self.generator = generator
        self.stream = stream
        self.batches: list[dict[str, ExampleGradients]] = []
        self.traces: dict[str, float] = dict.fromkeys(layers, 0.0)

    def observe(self, batch: Batch) -> int:
        """Forward, loss, backward (or sampled gradients) and the per-example gradients."""
        with self.capture:
            outputs = batch.forward(self.model)
            loss = batch.loss(outputs, self.loss_fn)
            check_loss(loss)
            if self.likelihood is not None:
                grads = self.capture.sampled_gradients(
                    output_tensor(outputs), self.likelihood, generator=self.generator
                )
            else:
                self.capture.backward(loss)
                grads = self.capture.example_gradients(loss_reduction="mean")
        self.capture.clear()
        grads = {key: _mask_padding(g, batch) for key, g in grads.items()}
        size = next(iter(grads.values())).batch_size
        self.samples += size
        if self.stream is None:
            self.batches.append(grads)
            return size
        with torch.no_grad():
            self.stream.update(grads)
            for key, g in grads.items():
                self.traces[key] += float(g.trace()) * g.batch_size
        return size

    def result(self) -> StepData:
        """The recorded gradients, or the stream's statistics and the Fisher's trace."""
        if self.stream is None:
            return StepData(batches=self.batches, samples=self.samples)
        return StepData(samples=self.samples, statistics=self.stream, traces=dict(self.traces))


class InputCollector(Collector):
    """Forward-only running sums ``H = Σ x xᵀ`` of each layer's inputs (no backward).

    Every row of a layer must see the same input (Linear, ungrouped Conv2d's patches,
    MultiheadAttention's in-projection): ``x`` is then the canonical input, with a last entry 1
    for the bias.

    Args:
        model: The model.
        loss_fn: The loss (only checked, for the same errors as the other collectors).
        layers: Adapters of the pruned layers, by weight name.
        method: The method's name, for error messages.

    Raises:
        ValueError: If a layer's rows do not all see one input.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        layers: Mapping[str, LayerAdapter],
        *,
        method: str = "",
    ) -> None:
        super().__init__(model, loss_fn)
        for key, adapter in layers.items():
            if not isinstance(adapter, OuterProductAdapter) or _groups(adapter) != 1:
                raise _unshared_input(key, method)
        self.layers: dict[str, OuterProductAdapter] = dict(layers)  # type: ignore[arg-type]
        self.hessians: dict[str, Tensor] = {}
        self._batch = 0

    def observe(self, batch: Batch) -> int:
        """One forward pass under ``no_grad``, adding each layer's ``Σ x xᵀ``."""
        handles = [
            adapter.install_hook(self._hook(key, batch)) for key, adapter in self.layers.items()
        ]
        try:
            with torch.no_grad():
                outputs = batch.forward(self.model)
                check_loss(batch.loss(outputs, self.loss_fn))
        finally:
            for handle in handles:
                handle.remove()
        size = self._batch
        self.samples += size
        return size

    def _hook(self, key: str, batch: Batch):  # type: ignore[no-untyped-def]
        adapter = self.layers[key]

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            x = args[0]
            assert isinstance(x, Tensor)
            rows = adapter.input_factor(x.detach().to(torch.float32))
            self._batch = int(rows.shape[0])
            if adapter.has_bias:
                rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
            rows = batch.mask_tokens(rows)
            _accumulate(self.hessians, key, input_hessian(rows))

        return hook

    def result(self) -> StepData:
        """The summed input second moments."""
        missing = [key for key in self.layers if key not in self.hessians]
        if missing:
            raise ValueError(f"The layers {missing} were not called in the forward pass.")
        return StepData(samples=self.samples, input_hessians=dict(self.hessians))


def _mask_padding(grads: ExampleGradients, batch: Batch) -> ExampleGradients:
    """Per-example gradients with the batch's padded tokens left out (outer-product layers)."""
    if batch.token_mask is None or not isinstance(grads, OuterProductGradients):
        return grads
    return OuterProductGradients(
        batch.mask_tokens(grads.inputs), batch.mask_tokens(grads.output_grads)
    )


def check_loss(loss: Any) -> None:
    """Check that ``loss_fn`` returned a finite scalar tensor.

    Raises:
        ValueError: Otherwise, with what it returned.
    """
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a scalar tensor (the batch mean), got {shape}.")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"`loss_fn` returned a non-finite loss ({float(loss.detach())}).")


def input_hessians_of(
    step: StepData, layers: Mapping[str, LayerAdapter], method: str = ""
) -> dict[str, Tensor]:
    """``H = Σ x xᵀ`` per layer: the step's streamed sums, or from recorded gradients' inputs.

    The callback records per-example gradients in the training step's own backward; their
    inputs give the same ``H``.

    Raises:
        ValueError: If a layer's rows do not all see one input.
    """
    if step.input_hessians is not None:
        return step.input_hessians
    hessians: dict[str, Tensor] = {}
    for key in layers:
        for grads in step.batches:
            inputs = getattr(grads[key], "inputs", None)
            if inputs is None or inputs.shape[2] != 1:
                raise _unshared_input(key, method)
            _accumulate(hessians, key, input_hessian(inputs))
    return hessians


def _accumulate(sums: dict[str, Tensor], key: str, part: Tensor) -> None:
    sums[key] = part if key not in sums else sums[key] + part


def _unshared_input(key: str, method: str) -> ValueError:
    return ValueError(
        f"`method={method!r}` needs a layer whose rows all see one input (Linear, ungrouped "
        f"Conv2d, MultiheadAttention); `{key}` is not one. Leave it out with `exclude`."
    )


def _groups(adapter: OuterProductAdapter) -> int:
    groups = getattr(adapter.module, "groups", 1)
    return int(groups) if isinstance(groups, int) else 1
