"""Diagonal curvature block: the cheapest structure, and the fallback for any parameter."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_fls._validation import check_positive
from lightning_fls.fishleg.base import CurvatureBlock, QOperator
from lightning_fls.fishleg.block_diagonal import _damped_inverse_diagonal
from lightning_fls.fishleg.statistics import LayerStatistics


class DiagonalBlock(CurvatureBlock):
    """Diagonal Q: ``Q·V = c · D ⊙ D ⊙ V`` with ``D`` (``scale``) of the canonical shape.

    Memory and cost are one float and one multiply per weight. With ``D`` fitted, Q tends to
    ``diag(1 / (F_kk + γ))`` only where F is diagonal; it ignores all correlations, so its OBS
    update changes nothing but the pruned weights.

    Args:
        shape: Canonical shape ``(d_out, d_in')``.
        init_scale: ``c`` at initialisation (``Q₀ = c·I``).
        dtype: Dtype of the auxiliary parameters.
        device: Device of the auxiliary parameters.
    """

    structure: ClassVar[str] = "diagonal"
    statistics_needed: ClassVar[frozenset[str]] = frozenset({"diag_fisher"})

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        init_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(shape, init_scale=init_scale, dtype=dtype, device=device)
        self.scale = nn.Parameter(torch.ones(self.shape, dtype=dtype, device=device))

    @override
    def operator(self) -> QOperator:
        q = self.base_scale * self.scale.square()

        def apply(V: Tensor) -> Tensor:
            return q * V

        return apply

    @override
    def diag_q(self) -> Tensor:
        return self.base_scale * self.scale.square()

    @override
    @torch.no_grad()
    def reset_parameters(self, init_scale: float) -> None:
        self.base_scale.fill_(check_positive("init_scale", init_scale))
        self.scale.fill_(1.0)

    @torch.no_grad()
    def init_from_statistics(self, stats: LayerStatistics, damping: float) -> None:
        """Initialise ``Q₀ = diag(1 / (diag F + γ))``, exact for a diagonal Fisher.

        Args:
            stats: Must hold ``diag_fisher``.
            damping: γ > 0.
        """
        q = _damped_inverse_diagonal(stats, damping, self.shape).to(self.device)
        c = q.mean()
        self.scale.copy_((q / c).sqrt().to(self.dtype))
        self.base_scale.fill_(float(c))
