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
    """

    name: ClassVar[str] = "kfac"
    default_joint: ClassVar[bool | None] = False
    default_structure: ClassVar[Structure] = "kronecker"
