"""Mini-batch gradients, the input of the oBERT and M-FAC estimators."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_fls.layers import ExampleGradients


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
