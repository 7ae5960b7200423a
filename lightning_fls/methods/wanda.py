"""``wanda``: Wanda's saliency ``|w|·‖x‖`` (Sun et al. 2023), no weight update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from lightning_fls.calibration import Calibration, StepData, input_hessians_of
from lightning_fls.masks import Scope
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


class InputNormScaling:
    """``Q = diag(1/‖x_j‖²)`` repeated over rows, so that ``ρ = w²/(2Q) = ½(|w_ij|·‖x_j‖)²``.

    OBS saliency with this Q orders weights as Wanda's ``|w_ij|·‖x_j‖`` (``‖x_j‖²`` the
    summed square of input ``j`` over the calibration examples, ``diag H``).

    Args:
        hessian: ``H = Σ x xᵀ`` ``[d_in', d_in']`` (only its diagonal is read).
        rows: ``d_out``.
    """

    def __init__(self, hessian: Tensor, rows: int) -> None:
        squares = hessian.diagonal().to(torch.float32)
        tiny = torch.finfo(torch.float32).tiny
        self.q = (1.0 / squares.clamp_min(tiny)).expand(rows, -1).clone()

    def qv(self, V: Tensor) -> Tensor:
        """``Q·V``, elementwise over columns."""
        return self.q * V

    def diag_q(self) -> Tensor:
        """``1/‖x_j‖²`` for every row, ``[d_out, d_in']``."""
        return self.q


@dataclass
class Wanda(PruningMethod):
    """Wanda: prune the weights of least ``|w_ij|·‖x_j‖``, per layer, with no weight update.

    Reads only forward inputs (no backward), like SparseGPT, and zeroes weights without OBS
    corrections, like magnitude pruning. Published with per-output comparison groups; here the
    ranking is per layer (``scope="layer"``, the default) or global.
    """

    name: ClassVar[str] = "wanda"
    calibration: ClassVar[Calibration] = "inputs"
    scopes: ClassVar[tuple[Scope, ...]] = ("layer", "global")
    default_steps: ClassVar[int] = 1
    corrects: ClassVar[bool] = False
    uses_damping: ClassVar[bool] = False

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """Each layer's input norms from ``diag H``."""
        hessians = input_hessians_of(step, engine.layers, self.name)
        estimates: dict[str, InverseCurvature] = {
            key: InputNormScaling(hessians[key], adapter.canonical_shape[0])
            for key, adapter in engine.layers.items()
        }
        return estimates, sum(h.shape[0] * 4 for h in hessians.values()) / 2**20
