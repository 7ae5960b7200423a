"""``obert``: oBERT / WoodFisher, block-wise Woodbury inverse of the mini-batch Fisher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from lightning_fls.baselines import BlockWoodburyInverse
from lightning_fls.calibration import StepData
from lightning_fls.methods._gradients import MinibatchGradientMethod
from lightning_fls.methods.base import Estimates
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class OBert(MinibatchGradientMethod):
    """oBERT (Kurtic et al. 2022): ``F_B = γI + (1/m) Σ g gᵀ`` on blocks of ``vec(W)``.

    Args:
        gradient_batch_size: Examples per gradient ``g`` (``m`` = samples / this; >= 1).
        block_size: Block size B (>= 1; 50 as published).
    """

    block_size: int = 50

    name: ClassVar[str] = "obert"
    default_joint: ClassVar[bool | None] = False

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """One Woodbury inverse per layer from the step's masked mini-batch gradients."""
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key, adapter in engine.layers.items():
            minibatch = self.layer_gradients(engine, step, key)
            woodbury = BlockWoodburyInverse(
                adapter.canonical_shape,
                num_gradients=minibatch.shape[0],
                damping=gamma,
                block_size=self.block_size,
                device=engine.device,
            )
            for chunk in torch.split(minibatch, 64):
                woodbury.update(chunk)
            estimates[key], state = woodbury, state + woodbury.state_bytes()
        return estimates, state / 2**20
