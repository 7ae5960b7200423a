"""``mfac``: static M-FAC, the mini-batch Fisher's inverse kept matrix-free."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from lightning_fls.baselines import MFACInverse
from lightning_fls.calibration import StepData
from lightning_fls.methods._gradients import GradientListStream, MinibatchGradientMethod
from lightning_fls.methods.base import Estimates
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class MFAC(MinibatchGradientMethod):
    """Static M-FAC (Frantar et al. 2021): ``F⁻¹x = γ⁻¹(x − Gᵀ(mγI + G Gᵀ)⁻¹ G x)`` per block.

    Its state is the ``m`` masked mini-batch gradients themselves (:class:`GradientListStream`),
    kept per layer, so it works in layer groups.

    Args:
        gradient_batch_size: Examples per gradient (``m`` = samples / this; >= 1).
        block_size: Block size (>= 1; 2000 as published).
    """

    block_size: int = 2000

    name: ClassVar[str] = "mfac"

    def new_stream(self, engine: PruningEngine, masks: dict[str, Tensor]) -> GradientListStream:
        """Empty gradient lists for the layers of ``masks``."""
        return GradientListStream(masks, self.gradient_batch_size)

    def layer_group_bytes(self, engine: PruningEngine) -> dict[str, int]:
        """Each layer's gradients and the factor built from them (float32, ``2·m·n``)."""
        m = math.ceil(engine.options.samples_per_step / self.gradient_batch_size)  # about
        return {key: 8 * m * math.prod(a.canonical_shape) for key, a in engine.layers.items()}

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """One M-FAC inverse per layer of the step's stream."""
        stream = self.step_stream(engine, step)
        assert isinstance(stream, GradientListStream)
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key in stream.held():
            mfac = MFACInverse(stream.pop(key), damping=gamma, block_size=self.block_size)
            estimates[key], state = mfac, state + mfac.state_bytes()
        return estimates, state / 2**20
