"""The interface shared by every per-layer curvature block.

A curvature block holds the auxiliary parameters λ of one layer and is the symmetric positive
semi-definite operator Q(λ) ≈ (F + γI)⁻¹ on that layer's canonical matrix (see
:mod:`lightning_fls.fishleg` for the layout and the vec convention).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_fls._validation import check_positive, check_positive_int
from lightning_fls.calibration_budget import DEFAULT_LARGE_MODEL_BUDGET, CalibrationBudget
from lightning_fls.fishleg.statistics import LayerStatistics, StatisticsAccumulator

QOperator = Callable[[Tensor], Tensor]
"""A prepared Q·V product: maps ``[..., d_out, d_in']`` to the same shape."""

DENSE_WARN_SIZE = 4096
"""Above this many canonical entries :meth:`CurvatureBlock.to_dense` warns about its cost."""


class CurvatureBlock(nn.Module, ABC):
    """A learned, structured approximation Q(λ) ≈ (F + γI)⁻¹ of one layer's Fisher block.

    Every block is ``Q = c · S(λ)`` where ``c`` (``base_scale``, a fixed buffer) carries the overall
    magnitude and ``S(λ)`` is symmetric positive semi-definite by construction (built from
    products ``L Lᵀ`` and elementwise squares). Keeping the magnitude in ``c`` leaves every learned
    parameter of order one, so one learning rate suits all layers and dampings. At
    initialisation ``S = I``, so ``Q₀ = c·I``; the FishLeg Surgeon paper's choice is ``c = 1/γ``.

    Subclasses implement :meth:`operator`, :meth:`diag_q`, :meth:`reset_parameters` and
    :meth:`init_from_statistics`. All maths runs in the block's own dtype (float32 unless chosen
    otherwise), whatever the dtype of the model.

    Args:
        shape: Canonical shape ``(d_out, d_in')`` of the layer, see :mod:`lightning_fls.fishleg`.
        init_scale: ``c``, so that ``Q₀ = init_scale · I``. Must be > 0.
        dtype: Floating dtype of the auxiliary parameters.
        device: Device of the auxiliary parameters.

    Raises:
        ValueError: If ``shape`` has a non-positive entry or ``init_scale`` is not > 0.
    """

    structure: ClassVar[str]
    """Short name of the structure, as used by :class:`~lightning_fls.fishleg.StructurePolicy`."""

    statistics_needed: ClassVar[frozenset[str]] = frozenset()
    """Which fields of :class:`LayerStatistics` :meth:`init_from_statistics` reads."""

    large_model_budget: ClassVar[CalibrationBudget] = DEFAULT_LARGE_MODEL_BUDGET
    """One-shot defaults on a large model for FishLeg methods whose default structure this is
    (see :func:`~lightning_fls.options.scale_defaults`): what its statistics and OBS cost per
    example and per step allow within minutes."""

    base_scale: Tensor

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        init_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"`shape` must be (d_out, d_in'), got {shape!r}.")
        d_out = check_positive_int("shape[0]", shape[0])
        d_in = check_positive_int("shape[1]", shape[1])
        init_scale = check_positive("init_scale", init_scale)
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")
        self._shape = (d_out, d_in)
        self.register_buffer("base_scale", torch.tensor(init_scale, dtype=dtype, device=device))

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical shape ``(d_out, d_in')`` this block acts on."""
        return self._shape

    @property
    def numel(self) -> int:
        """Number of canonical entries ``n = d_out · d_in'``; Q is ``n × n``."""
        return self._shape[0] * self._shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the auxiliary parameters and of every product."""
        return self.base_scale.dtype

    @property
    def device(self) -> torch.device:
        """Device of the auxiliary parameters."""
        return self.base_scale.device

    def new_statistics(self) -> StatisticsAccumulator:
        """An accumulator for the statistics :meth:`init_from_statistics` needs.

        Returns:
            A fresh :class:`StatisticsAccumulator` configured for this block.
        """
        return StatisticsAccumulator(self.statistics_needed)

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate multiplier per parameter name (1 where not listed).

        Adam moves every entry by about the learning rate whatever the gradient's size, so a
        noisy gradient on a dense ``d × d`` factor becomes a random ``d × d`` perturbation whose
        spectral norm grows like ``lr · √d``. Blocks scale the rate of such factors by
        ``1/√d`` so one learning rate suits layers of every width (measured:
        ``benchmarks/aux_convergence.py``).

        Returns:
            ``{parameter name: multiplier}``.
        """
        return {}

    def aux_state_bytes(self) -> int:
        """Bytes held by the auxiliary parameters and buffers (not optimiser state).

        Returns:
            The persistent memory of this block in bytes.
        """
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    @abstractmethod
    def operator(self) -> QOperator:
        """Prepare Q·V products for the current λ.

        Anything shared by several products (Gram matrices of the factors) is computed once here,
        under the ambient autograd mode: call it with gradients enabled to differentiate products
        with respect to λ, or under ``torch.no_grad()`` for plain products.

        Returns:
            A function ``V ↦ Q·V`` on tensors of shape ``[..., d_out, d_in']`` (leading dimensions
            are independent vectors).
        """

    @abstractmethod
    def diag_q(self) -> Tensor:
        """Diagonal of Q, ``[Q]_kk``, in canonical layout.

        Returns:
            Tensor of shape ``[d_out, d_in']``.
        """

    @abstractmethod
    def reset_parameters(self, init_scale: float) -> None:
        """Reset λ so that ``Q = init_scale · I``.

        Args:
            init_scale: New value of ``c``; must be > 0.
        """

    @abstractmethod
    def init_from_statistics(self, stats: LayerStatistics, damping: float) -> None:
        """Initialise λ from gradient statistics of the layer, so Q starts near ``(F + γI)⁻¹``.

        Args:
            stats: Statistics gathered over some batches (the fields in
                :attr:`statistics_needed` must be set).
            damping: γ > 0, in the units of the Fisher.
        """

    def qv(self, V: Tensor) -> Tensor:
        """Product ``Q·V`` on canonical matrices.

        Args:
            V: Tensor of shape ``[..., d_out, d_in']``.

        Returns:
            ``Q·V`` with the shape of ``V`` and the block's dtype.
        """
        return self.operator()(self._check_input(V))

    def outer_factors(
        self, x: Tensor, y: Tensor, *, detach: bool = False
    ) -> tuple[Tensor, Tensor] | None:
        """Factors ``(x', y')`` with ``Q·(x_p y_pᵀ) = x'_p y'_pᵀ``, if Q keeps outer products.

        Blocks for which this holds and is cheap (a pure Kronecker block: ``O(d²)`` instead of
        ``O(d³)``) override it; the default returns None.

        Args:
            x: Tensor ``[P, d_out]``.
            y: Tensor ``[P, d_in']``.
            detach: Use λ without its autograd graph (gradients still flow through x, y).

        Returns:
            ``(x', y')`` of the shapes of ``(x, y)``, or None.
        """
        return None

    def outer_qv(self, x: Tensor, y: Tensor) -> Tensor:
        """Product ``Q·(x yᵀ)`` for outer-product vectors, differentiable in λ.

        Uses :meth:`outer_factors` where the block has them, else materialises ``x yᵀ``.

        Args:
            x: Tensor ``[P, d_out]``.
            y: Tensor ``[P, d_in']``.

        Returns:
            Tensor ``[P, d_out, d_in']``.
        """
        factors = self.outer_factors(x, y)
        if factors is not None:
            return factors[0].unsqueeze(-1) * factors[1].unsqueeze(-2)
        return self.operator()(x.unsqueeze(-1) * y.unsqueeze(-2))

    def to_dense(self) -> Tensor:
        """Materialise Q as an explicit ``n × n`` matrix (row-major vec), for tests and debugging.

        Returns:
            Tensor of shape ``[n, n]`` with ``n = d_out · d_in'``.
        """
        n = self.numel
        if n > DENSE_WARN_SIZE:
            warnings.warn(
                f"to_dense() builds a {n}x{n} matrix; it is meant for small layers.",
                stacklevel=2,
            )
        eye = torch.eye(n, dtype=self.dtype, device=self.device).reshape(n, *self._shape)
        with torch.no_grad():
            columns = self.operator()(eye).reshape(n, n)
        return columns.T.contiguous()

    def _check_input(self, V: Tensor) -> Tensor:
        if V.dim() < 2 or tuple(V.shape[-2:]) != self._shape:
            raise ValueError(
                f"Expected a tensor of shape [..., {self._shape[0]}, {self._shape[1]}], "
                f"got {tuple(V.shape)}."
            )
        return V.to(self.dtype)

    @override
    def extra_repr(self) -> str:
        return f"shape={self._shape}, base_scale={self.base_scale.item():.4g}"
