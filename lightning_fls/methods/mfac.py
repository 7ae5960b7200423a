"""``mfac``: static M-FAC, the mini-batch Fisher's inverse kept matrix-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lightning_fls._validation import check_positive_int
from lightning_fls.baselines import MFACInverse
from lightning_fls.calibration import StepData
from lightning_fls.methods._gradients import minibatch_gradients
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class MFAC(PruningMethod):
    """Static M-FAC (Frantar et al. 2021): ``F⁻¹x = γ⁻¹(x − Gᵀ(mγI + G Gᵀ)⁻¹ G x)`` per block.

    Args:
        gradient_batch_size: Examples per gradient (``m`` = samples / this; >= 1).
        block_size: Block size (>= 1; 2000 as published).
    """

    gradient_batch_size: int = 16
    block_size: int = 2000

    name: ClassVar[str] = "mfac"

    def __post_init__(self) -> None:
        self.gradient_batch_size = check_positive_int(
            "gradient_batch_size", self.gradient_batch_size
        )
        self.block_size = check_positive_int("block_size", self.block_size)

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """One M-FAC inverse per layer from the step's masked mini-batch gradients."""
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key in engine.layers:
            mask = engine.canonical_mask(key).float()
            grads = [g[key] for g in step.batches]
            minibatch = minibatch_gradients(grads, self.gradient_batch_size) * mask
            mfac = MFACInverse(minibatch, damping=gamma, block_size=self.block_size)
            estimates[key], state = mfac, state + mfac.state_bytes()
        return estimates, state / 2**20
