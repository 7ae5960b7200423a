"""Calibration batches as models take them: ``(inputs, targets)`` pairs or keyword dicts.

Two forms are accepted wherever calibration batches are read
(:func:`~lightning_fls.prune_one_shot`):

* an ``(inputs, targets)`` pair: the model is called as ``model(inputs)`` and the loss is
  ``loss_fn(outputs, targets)``;
* a mapping of keyword arguments, such as a Hugging Face tokenizer's output with ``labels``:
  the model is called as ``model(**batch)`` and the loss is ``loss_fn(outputs, batch)``, or,
  without a ``loss_fn``, the model's own ``outputs.loss``.

A batch with an ``attention_mask`` of shape ``[B, T]`` marks its padding: every layer input of
shape ``[B, T, …]`` has its padded positions left out of the curvature statistics
(:meth:`Batch.mask_tokens`), so padding contributes nothing to any method's statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Any, Any], Tensor]
"""``loss_fn(outputs, targets)`` (pair batches) or ``loss_fn(outputs, batch)`` (dict batches)."""

TOKEN_MASK_KEY = "attention_mask"
"""The key of a dict batch whose ``[B, T]`` 0/1 tensor marks real tokens (1) and padding (0)."""


@dataclass
class Batch:
    """One calibration batch, on the model's device.

    Attributes:
        inputs: The model's positional input (pair batches) or its keyword arguments (dicts).
        targets: The loss's targets (pair batches; None for dicts).
        keywords: Whether the model is called with keyword arguments.
        token_mask: ``[B, T]`` bool, True for real tokens, from ``attention_mask``; or None.
    """

    inputs: Any
    targets: Any
    keywords: bool
    token_mask: Tensor | None = None

    def forward(self, model: nn.Module) -> Any:
        """``model(**inputs)`` for keyword batches, ``model(inputs)`` otherwise."""
        if self.keywords:
            return model(**self.inputs)
        return model(self.inputs)

    def loss(self, outputs: Any, loss_fn: LossFn | None) -> Any:
        """The batch's loss: ``loss_fn(outputs, targets or batch)``, or ``outputs.loss``.

        Raises:
            ValueError: Without ``loss_fn``, if the outputs carry no ``loss``.
        """
        if loss_fn is not None:
            return loss_fn(outputs, self.inputs if self.keywords else self.targets)
        loss = _output_loss(outputs)
        if loss is None:
            raise ValueError(
                "`loss_fn` is None and the model's output has no `loss` (a Hugging Face model "
                "computes one when the batch holds `labels`): pass `loss_fn(outputs, batch)`."
            )
        return loss

    def mask_tokens(self, value: Tensor) -> Tensor:
        """``value`` with padded positions zeroed, where its leading dims are ``[B, T]``.

        Args:
            value: A layer input or output gradient, ``[B, T, …]`` (anything else is
                returned unchanged: e.g. a pooler's ``[B, d]`` input).

        Returns:
            ``value · mask[..., None, …]``, or ``value`` itself.
        """
        mask = self.token_mask
        if mask is None or value.dim() < 3 or tuple(value.shape[:2]) != tuple(mask.shape):
            return value
        return value * mask.reshape(*mask.shape, *([1] * (value.dim() - 2))).to(value.dtype)


def make_batch(batch: Any, device: torch.device, *, loss_fn: LossFn | None) -> Batch:
    """Check one loader item and move it to ``device``.

    Args:
        batch: An ``(inputs, targets)`` pair or a mapping of keyword arguments.
        device: The model's device.
        loss_fn: The user's loss (None: the model's ``outputs.loss``).

    Raises:
        TypeError: If ``batch`` is neither form.
        ValueError: If a dict batch holds no tensor, or its ``attention_mask`` is malformed.
    """
    if isinstance(batch, Mapping):
        inputs = {key: _to(value, device) for key, value in batch.items()}
        tensors = [v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0]
        if not tensors:
            raise ValueError(
                f"A dict batch must hold at least one tensor with a batch dimension; got keys "
                f"{sorted(map(str, inputs))}."
            )
        rows = int(tensors[0].shape[0])
        return Batch(inputs, None, True, _token_mask(inputs.get(TOKEN_MASK_KEY), rows))
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "Batches must be (inputs, targets) pairs or dicts of keyword arguments, got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "."
        )
    inputs, targets = batch
    if loss_fn is None and targets is not None:
        raise ValueError(
            "`loss_fn` is None but the batches are (inputs, targets) pairs: pass "
            "`loss_fn(outputs, targets)`, or give dict batches to a model whose output has `loss`."
        )
    return Batch(_to(inputs, device), _to(targets, device), False)


def output_tensor(outputs: Any) -> Any:
    """The tensor a likelihood samples from: ``outputs`` itself, or a model output's ``logits``."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    return logits if isinstance(logits, Tensor) else outputs


def _output_loss(outputs: Any) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return getattr(outputs, "loss", None)


def _token_mask(mask: Any, size: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or int(mask.shape[0]) != size:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"`{TOKEN_MASK_KEY}` must be a [batch, tokens] tensor of 0/1 with the batch's "
            f"{size} rows, got {shape}."
        )
    return mask != 0


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value
