"""``sparsegpt``: SparseGPT's layer-wise column sweep on ``H = Σ x xᵀ`` (forward-only data)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lightning_fls._validation import check_positive
from lightning_fls.calibration import Calibration, StepData, input_hessians_of
from lightning_fls.masks import Scope
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import InverseCurvature
from lightning_fls.patterns import as_rows, pruned_per_group
from lightning_fls.sparsegpt import InputHessian, sparsegpt_prune

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class SparseGPT(PruningMethod):
    """SparseGPT (Frantar & Alistarh 2023): each layer to the target by OBS column by column.

    The curvature is the layer-wise reconstruction Hessian ``H = Σ x xᵀ``, the same for every
    row, streamed forward-only; masks are chosen during the sweep from the corrected weights.

    Args:
        hessian_damping: λ added to ``diag H`` relative to its mean (> 0; 1% as published).
    """

    hessian_damping: float = 0.01

    removes_units: ClassVar[bool] = False
    name: ClassVar[str] = "sparsegpt"
    calibration: ClassVar[Calibration] = "inputs"
    scopes: ClassVar[tuple[Scope, ...]] = ("layer",)
    scope_reason: ClassVar[str] = (
        "it reconstructs each layer on its own, so saliencies of different layers do not compare"
    )
    default_steps: ClassVar[int] = 1
    uses_damping: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.hessian_damping = check_positive("hessian_damping", self.hessian_damping)

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """Each layer's ``H`` (from the streamed sums, or the recorded gradients' inputs)."""
        hessians = input_hessians_of(step, engine.layers, self.name)
        estimates: dict[str, InverseCurvature] = {
            key: InputHessian(
                hessians[key], engine.layers[key].canonical_shape, self.hessian_damping
            )
            for key in engine.layers
        }
        mb = sum(h.numel() * 8 for h in hessians.values()) / 2**20
        return estimates, mb

    def prune(
        self, engine: PruningEngine, curvature: Mapping[str, InverseCurvature], target: float
    ) -> float:
        """Each layer to ``target`` by the column sweep (masks chosen as it goes).

        Returns:
            The summed layer-wise reconstruction error estimate ``½ Σ err²`` (not a loss).
        """
        pattern = engine.options.pattern
        total = 0.0
        for key, adapter in engine.layers.items():
            mask = engine.masks[key]
            pruned = int((~mask).sum())
            count = round(target * mask.numel())
            if pattern is not None:
                # Groups that held more than n zeros already leave less room (as select_masks).
                held = pruned_per_group(mask, pattern)
                count = min(count, pruned + int((pattern.n - held).clamp_min(0).sum()))
            if count <= pruned:
                continue
            estimate = curvature[key]
            assert isinstance(estimate, InputHessian)
            weight = adapter.canonical_weight()
            keep = engine.canonical_mask(key)
            columns = as_rows(mask).shape[1]
            if tuple(as_rows(mask).shape) != tuple(weight[:, :columns].shape):
                raise ValueError(
                    f"`method='sparsegpt'` needs the weight of `{key}` to be the leading columns "
                    "of its canonical matrix (Linear, Conv2d, MultiheadAttention)."
                )
            result = sparsegpt_prune(
                weight,
                estimate.hessian,
                keep,
                target=count,
                prunable_columns=columns,
                pattern=pattern,
                relative_damping=self.hessian_damping,
            )
            total += result.error
            parts = adapter.from_canonical(result.weight.to(weight.dtype))
            engine.masks[key] = adapter.from_canonical(result.keep)[adapter.key_parameter].clone()
            for name, value in parts.items():
                getattr(adapter.module, name).copy_(value)
        return total
