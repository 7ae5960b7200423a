"""Mini-batch gradients, the input of the oBERT and M-FAC estimators, and their shared options."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_fls._validation import check_positive_int
from lightning_fls.calibration import StepData
from lightning_fls.layers import ExampleGradients
from lightning_fls.methods.base import PruningMethod

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class MinibatchGradientMethod(PruningMethod):
    """Base of the methods whose Fisher is built from mini-batch gradients (oBERT, M-FAC).

    Args:
        gradient_batch_size: Examples per gradient (``m`` = samples / this; >= 1).
        block_size: Block size (>= 1).
    """

    gradient_batch_size: int = 16
    block_size: int = 50

    def __post_init__(self) -> None:
        self.gradient_batch_size = check_positive_int(
            "gradient_batch_size", self.gradient_batch_size
        )
        self.block_size = check_positive_int("block_size", self.block_size)

    def layer_gradients(self, engine: PruningEngine, step: StepData, key: str) -> Tensor:
        """The layer's mini-batch gradients of the step, masked to the surviving weights."""
        mask = engine.canonical_mask(key).float()
        grads = [g[key] for g in step.batches]
        return minibatch_gradients(grads, self.gradient_batch_size) * mask


def minibatch_gradients(per_batch: list[ExampleGradients], size: int) -> Tensor:
    """Mean gradients over consecutive groups of ``size`` examples, ``[m, d_out, d_in']``.

    Args:
        per_batch: One layer's per-example gradients, one entry per batch.
        size: Examples per gradient (the last group of a batch may be smaller).
    """
    out = []
    for grads in per_batch:
        batch = grads.batch_size
        groups = math.ceil(batch / size)
        coefficients = torch.zeros(groups, batch, device=grads.parts()[0].device)
        for g in range(groups):
            members = slice(g * size, min((g + 1) * size, batch))
            coefficients[g, members] = 1.0 / (members.stop - members.start)
        out.append(grads.combine(coefficients))
    return torch.cat(out)
