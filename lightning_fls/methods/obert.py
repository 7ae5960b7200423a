"""``obert``: oBERT / WoodFisher, the inverse of the damped block mini-batch Fisher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from lightning_fls.baselines import BlockWoodburyInverse
from lightning_fls.calibration import StepData
from lightning_fls.fishleg import StatisticsAccumulator
from lightning_fls.methods._gradients import BlockGramStream, MinibatchGradientMethod
from lightning_fls.methods.base import Estimates
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class OBert(MinibatchGradientMethod):
    """oBERT (Kurtic et al. 2022): ``F_B = γI + (1/m) Σ g gᵀ`` on blocks of ``vec(W)``.

    The block Fisher ``(1/m) Σ g gᵀ`` is folded batch by batch (:class:`BlockGramStream`), then each
    damped block is inverted directly: the inverse oBERT's Woodbury recursion reaches after all
    ``m`` gradients, without needing ``m`` and γ before the first gradient, so a step holds one
    batch of records at a time and the method works in layer groups.

    Args:
        gradient_batch_size: Examples per gradient ``g`` (``m`` = samples / this; >= 1).
        block_size: Block size B (>= 1; 50 as published).
    """

    block_size: int = 50

    name: ClassVar[str] = "obert"
    default_joint: ClassVar[bool | None] = False

    def new_stream(self, engine: PruningEngine, masks: dict[str, Tensor]) -> BlockGramStream:
        """An empty block Fisher for the layers of ``masks``."""
        return BlockGramStream(masks, self.gradient_batch_size, self.block_size)

    def layer_group_bytes(self, engine: PruningEngine) -> dict[str, int]:
        """Each layer's block Fisher (float32; the inverse takes its place)."""
        statistics = StatisticsAccumulator({"block_fisher"}, block_size=self.block_size)
        return {
            key: statistics.expected_bytes(a.canonical_shape) for key, a in engine.layers.items()
        }

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """One block inverse per layer of the stream, written over that layer's statistics."""
        stream = self.step_stream(engine, step)
        assert isinstance(stream, BlockGramStream)
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key in stream.held():
            statistics = stream.pop(key)
            assert statistics.block_fisher is not None
            inverse = BlockWoodburyInverse.from_block_fisher(
                engine.layers[key].canonical_shape,
                statistics.block_fisher,
                num_gradients=statistics.num_examples,
                damping=gamma,
            )
            estimates[key], state = inverse, state + inverse.state_bytes()
        return estimates, state / 2**20
