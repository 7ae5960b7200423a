"""Pruning methods: one module per method behind :class:`PruningMethod`, found by name.

Built in (registered at import):

========================  =====================================================  ==============
name                      curvature                                              calibration
========================  =====================================================  ==============
``fls`` (:class:`FLS`)    FishLeg Q, Kronecker-factored (joint OBS per row)      gradients
``kfac`` (:class:`KFAC`)  the same Q, single OBS updates summed                  gradients
``obert`` (:class:`OBert`)  block Woodbury inverse of the mini-batch Fisher      gradients
``mfac`` (:class:`MFAC`)  matrix-free M-FAC inverse                              gradients
``diag_fisher``           diagonal empirical Fisher (:class:`DiagFisher`)        gradients
``sparsegpt``             ``Σ x xᵀ``, column sweep (:class:`SparseGPT`)          inputs
``wanda`` (:class:`Wanda`)  ``|w|·‖x‖``, no correction                           inputs
``magnitude``             ``Q = I``, no correction (:class:`Magnitude`)          none
========================  =====================================================  ==============

Add one with :func:`register_method`.
"""

from __future__ import annotations

from lightning_fls.methods.base import (
    Estimates,
    PruningMethod,
    method_class,
    method_names,
    register_method,
    resolve_method,
    unregister_method,
)
from lightning_fls.methods.diag_fisher import DiagFisher
from lightning_fls.methods.fls import FLS
from lightning_fls.methods.kfac import KFAC
from lightning_fls.methods.magnitude import Magnitude
from lightning_fls.methods.mfac import MFAC
from lightning_fls.methods.obert import OBert
from lightning_fls.methods.sparsegpt import SparseGPT
from lightning_fls.methods.wanda import Wanda

for _cls in (FLS, KFAC, OBert, MFAC, DiagFisher, SparseGPT, Magnitude, Wanda):
    register_method(_cls.name, _cls)

BUILTIN_METHODS: tuple[str, ...] = method_names()
"""The built-in method names."""

__all__ = [
    "BUILTIN_METHODS",
    "FLS",
    "KFAC",
    "MFAC",
    "DiagFisher",
    "Estimates",
    "Magnitude",
    "OBert",
    "PruningMethod",
    "SparseGPT",
    "Wanda",
    "method_class",
    "method_names",
    "register_method",
    "resolve_method",
    "unregister_method",
]
