"""``fls``: the FishLeg Surgeon, Kronecker-factored FishLeg Q per layer (the default method)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lightning_fls._validation import check_non_negative_int, check_positive
from lightning_fls.calibration import StepData
from lightning_fls.fishleg import AuxiliaryOptimizer, CurvatureBlock
from lightning_fls.fishleg.registry import Structure
from lightning_fls.methods._fishleg import FishLegMethod

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine

AUX_DIVERGENCE_FACTOR = 10.0
"""A layer's auxiliary fit has diverged when its loss exceeds ``A₀ + 10·|A₀|`` (``A₀``: first)."""


@dataclass
class FLS(FishLegMethod):
    """FishLeg Surgeon: Q(λ) ≈ (F + γI)⁻¹ per layer, Kronecker-factored by default.

    At each step Q starts from the step's statistics. For the default Kronecker Q,
    ``Q = c·G_o ⊗ G_i``, that start is the damped inverse of the K-FAC factors (the input
    covariance over every example, or a drawn ``token_fraction`` of each sequence's tokens, and
    the output-gradient covariance), and OBS is
    joint inside each row (:func:`~lightning_fls.obs.kronecker_row_obs_update`; one-shot, by
    default, solved exactly except in rows too wide for that, and in the callback by a column
    sweep refined towards it: ``row_update``). For a
    block-diagonal Q (``structure=StructurePolicy("block_diagonal")``, blocks of ``B`` = 50
    weights) the start is the auxiliary loss's exact minimiser for the step's data,
    ``(F_j + γI)⁻¹`` per block, and OBS is joint inside blocks. Optional auxiliary (Adam)
    passes refine either start.

    Args:
        structure: Per-layer block structure (default: Kronecker for Linear and Conv2d
            layers, diagonal for a factor side above 4096 and for layers without an adapter;
            see :class:`~lightning_fls.fishleg.StructurePolicy`).
        refine_passes: Auxiliary-loss passes over each step's batches after the
            statistics-based start (>= 0; 0 by default).
        reestimate: Restart Q from each step's statistics before refining it (True), or keep
            refining the previous step's Q (False, the FLS paper's "refinement instead of
            re-estimation").
        aux_lr: Learning rate of the auxiliary fit (> 0).
        token_fraction: Fraction of each example's positions (tokens, conv output pixels) in
            the Kronecker statistics, in ``(0, 1]`` (keyword only; see
            :class:`~lightning_fls.methods._fishleg.FishLegMethod`).
    """

    refine_passes: int = 0
    reestimate: bool = True
    aux_lr: float = 1e-3

    name: ClassVar[str] = "fls"
    default_joint: ClassVar[bool | None] = True
    default_structure: ClassVar[Structure] = "kronecker"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.refine_passes = check_non_negative_int("refine_passes", self.refine_passes)
        self.reestimate = bool(self.reestimate)
        self.aux_lr = check_positive("aux_lr", self.aux_lr)

    def reestimates(self) -> bool:
        """Whether every step restarts Q from its statistics (``reestimate``)."""
        return self.reestimate

    def refines(self) -> bool:
        """Whether auxiliary passes run (they read the step's per-example records)."""
        return self.refine_passes > 0

    def refine(self, engine: PruningEngine, step: StepData, gamma: float) -> None:
        """Auxiliary (Adam) passes over the step's batches, rolled back if the fit diverges.

        The blocks' λ before the passes is the last good state. A layer update whose loss or
        gradient is not finite is skipped (counted in ``engine.skipped_aux_updates``). If the
        summed auxiliary loss rises past ``A₀ + AUX_DIVERGENCE_FACTOR·|A₀|``, or a block's
        ``diag(Q)`` ends non-finite or non-positive, λ returns to the last good state, the
        optimiser's moments are dropped, the damping of later estimates is raised
        (``engine.raise_damping``) and a warning says so.
        """
        if self.refine_passes == 0:
            return
        assert self.blocks is not None
        if self.aux is None:
            self.aux = AuxiliaryOptimizer(self.blocks, lr=self.aux_lr, seed=engine.options.seed)
        good = {key: _copy_state(block) for key, block in self.blocks.items()}
        masks = {k: engine.canonical_mask(k) for k in engine.layers}
        first: dict[str, float] = {}
        diverged = False
        for _ in range(self.refine_passes):
            for grads in step.batches:
                result = self.aux.step({k: g.fvp for k, g in grads.items()}, gamma, masks=masks)
                engine.skipped_aux_updates += len(result.skipped)
                for key, loss in result.losses.items():
                    if key in result.skipped:
                        continue
                    start = first.setdefault(key, loss)
                    diverged |= loss > start + AUX_DIVERGENCE_FACTOR * abs(start)
                if diverged:
                    break
            if diverged:
                break
        if diverged or not all(_finite_positive(b.diag_q()) for b in self.blocks.values()):
            for key, block in self.blocks.items():
                block.load_state_dict(good[key])
            self.aux = None
            engine.rollbacks += 1
            engine.raise_damping()
            warnings.warn(
                f"The FishLeg auxiliary fit diverged (aux_lr={self.aux_lr:g}, damping "
                f"{gamma:.3g}); Q was rolled back to its state before the fit and the damping "
                f"of later estimates raised (now {engine.damping_scale:g}× the configured "
                "value). Lower `aux_lr` if this repeats.",
                RuntimeWarning,
                stacklevel=2,
            )


def _copy_state(block: CurvatureBlock) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in block.state_dict().items()}


def _finite_positive(values: Tensor) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(values).all()) and bool((values > 0).all())
