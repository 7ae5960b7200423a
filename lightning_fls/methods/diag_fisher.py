"""``diag_fisher``: the empirical diagonal Fisher, ``Q = diag(1/(diag F + γ))``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lightning_fls.baselines import DiagonalInverse
from lightning_fls.calibration import StepData
from lightning_fls.fishleg import StatisticsAccumulator
from lightning_fls.methods._fishleg import LayerStatisticsStream
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class DiagFisher(PruningMethod):
    """Diagonal empirical Fisher per layer, masked to the surviving weights.

    ``diag F`` is folded batch by batch (a ``LayerStatisticsStream``), so a step holds one
    batch of records at a time and the method works in layer groups.
    """

    name: ClassVar[str] = "diag_fisher"

    def stream(
        self, engine: PruningEngine, keys: Sequence[str] | None = None
    ) -> LayerStatisticsStream:
        """Each layer's masked ``diag F``, folded batch by batch.

        Args:
            engine: The engine.
            keys: The layers to gather (None: every layer).
        """
        return self._stream_for(engine, keys)

    def _stream_for(
        self, engine: PruningEngine, keys: Sequence[str] | None
    ) -> LayerStatisticsStream:
        keys = list(engine.layers) if keys is None else list(keys)
        return LayerStatisticsStream(
            {key: StatisticsAccumulator({"diag_fisher"}) for key in keys},
            {key: engine.canonical_mask(key).float() for key in keys},
        )

    def layer_group_bytes(self, engine: PruningEngine) -> dict[str, int]:
        """Each layer's ``diag F`` (float32, one entry per weight)."""
        return {key: 4 * math.prod(a.canonical_shape) for key, a in engine.layers.items()}

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """``diag F`` of the step's per-example gradients, damped by γ."""
        stream = step.statistics
        if not isinstance(stream, LayerStatisticsStream):
            stream = self._stream_for(engine, None)
            for grads in step.batches:
                stream.update(grads)
        estimates: dict[str, InverseCurvature] = {}
        for key in list(stream.accumulators):
            diag = stream.pop(key).diag_fisher
            assert diag is not None
            estimates[key] = DiagonalInverse(diag, gamma)
        mb = sum(e.diag_q().numel() * 4 for e in estimates.values()) / 2**20
        return estimates, mb
