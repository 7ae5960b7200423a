"""Mini-batch gradients, the input of the oBERT and M-FAC estimators, and their shared options.

Both methods fold a step's gradients batch by batch (:class:`MinibatchStream`): each batch's
per-example gradients become mini-batch gradients, masked to the surviving weights, and go into
what the method keeps (oBERT: the block Fisher ``(1/m) Σ g gᵀ``; M-FAC: the gradients
themselves). No batch's per-example records are held past its own fold, and a stream may cover
only some layers, so both methods work in layer groups (:mod:`lightning_fls.layer_groups`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_fls._validation import check_positive_int
from lightning_fls.calibration import StepData
from lightning_fls.fishleg import LayerStatistics, StatisticsAccumulator
from lightning_fls.layers import ExampleGradients
from lightning_fls.layers.gradients import DenseGradients
from lightning_fls.methods.base import PruningMethod

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


class MinibatchStream(ABC):
    """Each layer's masked mini-batch gradients, folded batch by batch into a method's state.

    Args:
        masks: The canonical 0/1 masks ``[d_out, d_in']`` of the surviving weights, by weight
            name: the layers this stream covers.
        gradient_batch_size: Examples per mini-batch gradient (a batch's last group may be
            smaller).

    Attributes:
        counts: Mini-batch gradients folded so far, by weight name.
    """

    def __init__(self, masks: dict[str, Tensor], gradient_batch_size: int) -> None:
        self.masks = masks
        self.gradient_batch_size = gradient_batch_size
        self.counts = dict.fromkeys(masks, 0)

    def held(self) -> list[str]:
        """The weight names still held."""
        return list(self.masks)

    def update(self, gradients: Mapping[str, ExampleGradients]) -> None:
        """Fold one batch into every covered layer's state (then the batch can go)."""
        for key, mask in self.masks.items():
            grads = minibatch_gradients([gradients[key]], self.gradient_batch_size) * mask
            self._fold(key, grads)
            self.counts[key] += grads.shape[0]

    @abstractmethod
    def _fold(self, key: str, grads: Tensor) -> None:
        """Fold a layer's ``[k, d_out, d_in']`` masked mini-batch gradients into its state."""

    def _release(self, key: str) -> int:
        """Forget the layer; the number of its gradients."""
        self.masks.pop(key)
        count = self.counts.pop(key)
        if count == 0:
            raise RuntimeError(f"No gradient of `{key}` was folded into the stream.")
        return count


class BlockGramStream(MinibatchStream):
    """oBERT's state: per layer, the block Fisher ``(1/m) Σ_i g_i g_iᵀ`` of its gradients.

    The mini-batch gradients go, as ``DenseGradients``, to the same
    :class:`~lightning_fls.fishleg.StatisticsAccumulator` that gathers FLS's per-example block
    statistics: blocks of ``vec(W)``, float32.

    Args:
        masks: As :class:`MinibatchStream`.
        gradient_batch_size: As :class:`MinibatchStream`.
        block_size: ``B``: the blocks are ``[⌈d_out·d_in'/B⌉, B, B]``, as large as the inverse.
    """

    def __init__(self, masks: dict[str, Tensor], gradient_batch_size: int, block_size: int) -> None:
        super().__init__(masks, gradient_batch_size)
        self.accumulators = {
            key: StatisticsAccumulator({"block_fisher"}, block_size=block_size) for key in masks
        }

    def _fold(self, key: str, grads: Tensor) -> None:
        self.accumulators[key].update(DenseGradients(grads))  # already masked

    def pop(self, key: str) -> LayerStatistics:
        """A layer's statistics (``block_fisher`` and the number of gradients), handed over.

        Raises:
            RuntimeError: If no gradient of the layer was folded.
        """
        self._release(key)
        return self.accumulators.pop(key).result(release=True)


class GradientListStream(MinibatchStream):
    """M-FAC's state: per layer, the masked mini-batch gradients themselves."""

    def __init__(self, masks: dict[str, Tensor], gradient_batch_size: int) -> None:
        super().__init__(masks, gradient_batch_size)
        self.parts: dict[str, list[Tensor]] = {key: [] for key in masks}

    def _fold(self, key: str, grads: Tensor) -> None:
        self.parts[key].append(grads)

    def pop(self, key: str) -> Tensor:
        """A layer's gradients ``[m, d_out, d_in']``.

        Raises:
            RuntimeError: If no gradient of the layer was folded.
        """
        self._release(key)
        return torch.cat(self.parts.pop(key))


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

    def stream(self, engine: PruningEngine, keys: Sequence[str] | None = None) -> MinibatchStream:
        """The layers' state (:meth:`new_stream`), folded batch by batch.

        Args:
            engine: The engine (the layers and their masks).
            keys: The layers to cover (None: every layer).
        """
        return self._stream_for(engine, keys)

    def _stream_for(self, engine: PruningEngine, keys: Sequence[str] | None) -> MinibatchStream:
        keys = list(engine.layers) if keys is None else list(keys)
        return self.new_stream(engine, {key: engine.canonical_mask(key).float() for key in keys})

    @abstractmethod
    def new_stream(self, engine: PruningEngine, masks: dict[str, Tensor]) -> MinibatchStream:
        """An empty stream of the method's state for the layers of ``masks``."""

    def step_stream(self, engine: PruningEngine, step: StepData) -> MinibatchStream:
        """The step's streamed state, or the recorded batches folded into a new one."""
        if isinstance(step.statistics, MinibatchStream):
            return step.statistics
        stream = self._stream_for(engine, None)
        for grads in step.batches:
            stream.update(grads)
        return stream


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
