"""``mfac``: static M-FAC, the mini-batch Fisher's inverse kept matrix-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lightning_fls.baselines import MFACInverse
from lightning_fls.calibration import StepData
from lightning_fls.methods._gradients import MinibatchGradientMethod
from lightning_fls.methods.base import Estimates
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class MFAC(MinibatchGradientMethod):
    """Static M-FAC (Frantar et al. 2021): ``F⁻¹x = γ⁻¹(x − Gᵀ(mγI + G Gᵀ)⁻¹ G x)`` per block.

    Args:
        gradient_batch_size: Examples per gradient (``m`` = samples / this; >= 1).
        block_size: Block size (>= 1; 2000 as published).
    """

    block_size: int = 2000

    name: ClassVar[str] = "mfac"

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """One M-FAC inverse per layer from the step's masked mini-batch gradients."""
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key in engine.layers:
            minibatch = self.layer_gradients(engine, step, key)
            mfac = MFACInverse(minibatch, damping=gamma, block_size=self.block_size)
            estimates[key], state = mfac, state + mfac.state_bytes()
        return estimates, state / 2**20
