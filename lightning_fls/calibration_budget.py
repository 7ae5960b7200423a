"""How many calibration examples and steps a large model gets by default (one-shot).

A method that reads per-example gradients pays for its statistics per example and per step, so
the small-model defaults (16 steps × 1024 examples) take an hour on a pretrained transformer.
Above :data:`~lightning_fls.options.LARGE_MODEL_WEIGHTS` pruned weights, ``prune_one_shot``
replaces the defaults the user left unset by a :class:`CalibrationBudget`: the method's own
(:meth:`~lightning_fls.methods.PruningMethod.large_model_budget`, for FishLeg methods the one of
their default block structure) or :data:`DEFAULT_LARGE_MODEL_BUDGET`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_fls._validation import check_positive_int


@dataclass(frozen=True)
class CalibrationBudget:
    """Default steps and calibration examples per step of one-shot pruning on a large model.

    Args:
        samples_per_step: Calibration examples per recomputation step.
        steps: Recomputation steps up to
            :data:`~lightning_fls.options.LARGE_MODEL_ONE_STEP_SPARSITY`.
        high_sparsity_steps: Recomputation steps above it.

    Raises:
        ValueError: If a count is not a positive integer, or ``high_sparsity_steps < steps``.
    """

    samples_per_step: int
    steps: int
    high_sparsity_steps: int

    def __post_init__(self) -> None:
        check_positive_int("samples_per_step", self.samples_per_step)
        check_positive_int("steps", self.steps)
        check_positive_int("high_sparsity_steps", self.high_sparsity_steps)
        if self.high_sparsity_steps < self.steps:
            raise ValueError(
                f"`high_sparsity_steps` must be at least `steps` ({self.steps}), got "
                f"{self.high_sparsity_steps}."
            )


DEFAULT_LARGE_MODEL_BUDGET = CalibrationBudget(samples_per_step=256, steps=1, high_sparsity_steps=2)
"""The large-model budget of a method without its own: 1 step (2 above half sparsity) × 256.

Measured with the block-diagonal ``fls`` (statistics ``∝ samples × weights × B``) on the
pretrained all-MiniLM-L6-v2 encoder (10.6 M pruned weights, 48-token sentences;
``python -m benchmarks.pretrained``): at 50% 1 step × 256 took 56 s and kept a mean embedding
cosine of 0.932 to the dense model, where the small-model default had not finished after
15 minutes; at 70% two steps kept 0.773 in 128–144 s against one step's 0.756 in 70 s
(SparseGPT: 0.759); at 50% two steps gave nothing for twice the time (0.931 against 0.932) and
at 2:4 they did worse (0.768 against 0.782)."""
