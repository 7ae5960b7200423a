"""Named layer cases shared by the block, Fisher and capture tests (small sizes, float64)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerCase:
    id: str
    make_module: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch dimension


def _conv(*args: object, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(*args, **kwargs, dtype=torch.float64)  # type: ignore[arg-type]


def _linear(*args: object, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(*args, **kwargs, dtype=torch.float64)  # type: ignore[arg-type]


LAYER_CASES = [
    LayerCase("linear-3x2", _linear(3, 2), (3,)),
    LayerCase("linear-4x5-nobias", _linear(4, 5, bias=False), (4,)),
    LayerCase("linear-tokens", _linear(3, 4), (2, 3)),
    LayerCase("conv-k2-s2", _conv(2, 3, 2, stride=2), (2, 5, 5)),
    LayerCase("conv-k3-p1-nobias", _conv(2, 2, 3, padding=1, bias=False), (2, 4, 4)),
    LayerCase("conv-dilation-stride", _conv(1, 2, 2, stride=(2, 1), dilation=2), (1, 6, 5)),
    LayerCase("conv-groups2", _conv(4, 2, (2, 1), groups=2, padding=(1, 0)), (4, 3, 3)),
    LayerCase(
        "conv-same-reflect", _conv(2, 2, 3, padding="same", padding_mode="reflect"), (2, 4, 4)
    ),
]


def batch_for(case: LayerCase, batch: int = 5) -> Tensor:
    return torch.randn(batch, *case.input_shape, dtype=torch.float64)
