"""``diag_fisher``: the empirical diagonal Fisher, ``Q = diag(1/(diag F + γ))``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lightning_fls.baselines import DiagonalInverse
from lightning_fls.calibration import StepData
from lightning_fls.fishleg import StatisticsAccumulator
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class DiagFisher(PruningMethod):
    """Diagonal empirical Fisher per layer, masked to the surviving weights."""

    name: ClassVar[str] = "diag_fisher"

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """``diag F`` of the step's per-example gradients, damped by γ."""
        estimates: dict[str, InverseCurvature] = {}
        for key in engine.layers:
            accumulator = StatisticsAccumulator({"diag_fisher"})
            for grads in step.batches:
                accumulator.update(grads[key])
            diag = accumulator.result().diag_fisher
            assert diag is not None
            estimates[key] = DiagonalInverse(diag * engine.canonical_mask(key), gamma)
        mb = sum(e.diag_q().numel() * 4 for e in estimates.values()) / 2**20
        return estimates, mb
