"""``kfac``: FishLeg's Kronecker-factored Q from each step's statistics, no auxiliary fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_fls.fishleg.registry import Structure
from lightning_fls.methods._fishleg import FishLegMethod


@dataclass
class KFAC(FishLegMethod):
    """Kronecker-factored Q per layer, re-estimated from each step's statistics (K-FAC).

    Args:
        structure: Per-layer block structure (default Kronecker-factored).
        token_fraction: Fraction of each example's positions (tokens, conv output pixels) in
            the Kronecker statistics, in ``(0, 1]`` (keyword only; see
            :class:`~lightning_fls.methods._fishleg.FishLegMethod`).
    """

    name: ClassVar[str] = "kfac"
    default_joint: ClassVar[bool | None] = False
    default_structure: ClassVar[Structure] = "kronecker"
