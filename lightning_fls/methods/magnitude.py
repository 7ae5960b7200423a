"""``magnitude``: the smallest ``|w|`` go, no data and no correction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lightning_fls.baselines import IdentityCurvature
from lightning_fls.calibration import Calibration, StepData
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class Magnitude(PruningMethod):
    """Magnitude pruning: ``Q = I``, so ``ρ = w²/2``; pruned weights are zeroed, nothing else."""

    name: ClassVar[str] = "magnitude"
    calibration: ClassVar[Calibration] = "none"
    default_steps: ClassVar[int] = 1
    corrects: ClassVar[bool] = False
    uses_damping: ClassVar[bool] = False

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """``Q = I`` for every layer."""
        estimates: dict[str, InverseCurvature] = {
            k: IdentityCurvature(a.canonical_shape, engine.device) for k, a in engine.layers.items()
        }
        return estimates, 0.0
