"""SparseGPT: one-shot pruning of one layer by column-by-column OBS (Frantar & Alistarh, 2023).

A layer ``y = W x`` with weight ``W`` ``[rows, cols]`` and calibration inputs ``X``
``[cols, tokens]`` (one input vector per column) is pruned against the layer-wise
reconstruction loss

    L(W') = ||W X − W' X||² = Σ_rows (w − w')ᵀ H (w − w'),   H = X Xᵀ  ``[cols, cols]``,

whose Hessian ``H`` is the same for every output row. SparseGPT sweeps the columns left to
right. With ``H⁻¹ = Uᵀ U`` (``U`` the upper Cholesky factor of the inverse Hessian), row ``j``
of ``U`` holds, up to the scale ``U_jj``, the inverse of the Hessian restricted to the
columns ``≥ j``: ``U_jk / U_jj = [H_{≥j}⁻¹]_jk / [H_{≥j}⁻¹]_jj`` and
``U_jj² = [H_{≥j}⁻¹]_jj``. So when column ``j`` is reached (columns ``< j`` frozen), zeroing
an entry ``w_j`` of a row and moving the later weights of that row optimally is the OBS step

    err = w_j / U_jj,   w_k ← w_k − err · U_jk  for k > j,   loss increase err²,

for every row at once (a rank-one update). Kept entries have ``err = 0``. Which entries to
prune is chosen window by window from the *current* (already corrected) weights with the
OBS saliency ``w² / U_jj²``. Updates to columns past a block of ``block_size`` columns are
deferred and applied once per block as one matrix product (the lazy batch update), which
does not change the result beyond rounding.

Since ``W' = W − E U`` with ``E`` ``[rows, cols]`` the matrix of all ``err`` values and
``U H Uᵀ = I``, the final loss is exactly ``(W − W') H (W − W')ᵀ`` traced ``= ||E||²``: the
reported :attr:`SparseGPTResult.error` ``= ½ ||E||²`` is half the layer-wise loss measured
with the damped Hessian.

Everything here is plain tensor maths (no Lightning) and runs in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fls._linalg import damped_inverse_root, robust_cholesky
from lightning_fls.patterns import NMPattern

__all__ = [
    "InputHessian",
    "SparseGPTResult",
    "input_hessian",
    "inverse_hessian_factor",
    "obs_sweep",
    "sparsegpt_prune",
]

_Choose = Callable[[int, int, Tensor], Tensor]
"""``choose(start, end, current)`` → bool prune mask ``[rows, end − start]`` of a window."""


@dataclass(frozen=True)
class SparseGPTResult:
    """The outcome of :func:`sparsegpt_prune`.

    Attributes:
        weight: ``[rows, cols]`` new weights, same dtype and device as the input weight;
            pruned entries are exactly 0.
        keep: bool ``[rows, cols]`` final mask, True = kept.
        error: ``½ Σ err²`` over the pruned entries, ``err = w_j / U_jj`` with ``w_j`` the
            (corrected) weight when its column is processed: SparseGPT's estimate of the
            layer-wise loss, equal to ``½ tr((W − W') H (W − W')ᵀ)`` with the damped ``H``.
    """

    weight: Tensor
    keep: Tensor
    error: float


def input_hessian(inputs: Tensor) -> Tensor:
    """The layer-wise Hessian ``H = Σ x xᵀ`` of a batch of layer inputs.

    Args:
        inputs: ``[..., d]`` layer inputs; every leading index (batch, token, ...) is one
            input vector ``x`` of ``d`` features.

    Returns:
        float64 ``[d, d]`` tensor ``Σ_{leading} x xᵀ`` (unnormalised), on the inputs' device.

    Raises:
        ValueError: If ``inputs`` is 0-dimensional.
    """
    if inputs.dim() < 1:
        raise ValueError("`inputs` must have at least one dimension (the features), got a scalar.")
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    return x.mT @ x


def damped_hessian(hessian: Tensor, *, relative_damping: float = 0.01) -> Tensor:
    """SparseGPT's dampened Hessian: dead inputs set to 1, then ``λ I`` added.

    Columns with ``H_jj = 0`` (inputs that are always 0) get ``H_jj = 1``, then
    ``λ = relative_damping · mean(diag H)`` is added to the diagonal.

    Args:
        hessian: ``[cols, cols]`` ``Σ x xᵀ``.
        relative_damping: The damping relative to the mean diagonal.

    Returns:
        A float64 copy, damped.
    """
    H = hessian.to(torch.float64).clone()
    diagonal = H.diagonal()
    diagonal[diagonal == 0] = 1.0  # dead inputs: any positive value keeps H invertible
    if H.numel():
        diagonal += relative_damping * float(diagonal.mean())
    return H


def inverse_hessian_factor(hessian: Tensor, *, relative_damping: float = 0.01) -> Tensor:
    """The upper Cholesky factor ``U`` of the damped inverse Hessian, ``H⁻¹ = Uᵀ U``.

    Columns with ``H_jj = 0`` (inputs that are always 0) get ``H_jj = 1`` first, then
    ``λ = relative_damping · mean(diag H)`` is added to the diagonal.

    Args:
        hessian: ``[cols, cols]`` symmetric positive semi-definite ``Σ x xᵀ``.
        relative_damping: ``≥ 0``, the damping relative to the mean diagonal.

    Returns:
        float64 ``[cols, cols]`` upper-triangular ``U`` with positive diagonal.

    Both Cholesky factorisations go through
    :func:`~lightning_fls._linalg.robust_cholesky`: a damped Hessian that rounding (or
    ``relative_damping=0`` on collinear inputs) leaves indefinite gets an eigenvalue floor, a
    counted fallback, instead of an error.

    Raises:
        ValueError: If ``hessian`` is not square, not finite, or ``relative_damping`` is
            negative.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"`hessian` must be a square matrix, got shape {tuple(hessian.shape)}.")
    if (
        isinstance(relative_damping, bool)
        or not isinstance(relative_damping, (int, float))
        or not math.isfinite(relative_damping)
        or relative_damping < 0
    ):
        raise ValueError(
            f"`relative_damping` must be a finite number >= 0, got {relative_damping!r}."
        )
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("`hessian` has non-finite entries.")
    H = damped_hessian(hessian, relative_damping=relative_damping)
    L = robust_cholesky(H)
    return robust_cholesky(torch.cholesky_inverse(L), upper=True)


def _sweep(
    W: Tensor,
    U: Tensor,
    prune: Tensor,
    block_size: int,
    windows: dict[int, int],
    choose: _Choose | None,
) -> float:
    """The column sweep, in place on ``W`` (float64) and ``prune`` (bool).

    Before column ``j`` in ``windows`` (a window ``[j, windows[j])``) is processed,
    ``choose(j, end, current)`` gets that window's current weights (every update of the
    earlier columns applied) and returns the window's prune mask.

    Returns:
        ``½ Σ err²``.
    """
    rows, cols = W.shape
    total = W.new_zeros(())
    # Few tensor operations per column (on a CPU their count costs more than their size; 1.2×
    # faster over the autoencoder's row updates): the mask as 0/1 factors, ``err`` one product.
    factors = (
        None if choose is not None else (prune.to(W.dtype) / U.diagonal(), (~prune).to(W.dtype))
    )
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        E = W.new_zeros(rows, i2 - i1)
        for j in range(i1, i2):
            end = windows.get(j)
            if end is not None and choose is not None:
                current = W[:, j:end].clone()
                if end > i2:  # columns past the block still miss this block's updates so far
                    current[:, i2 - j :] -= E[:, : j - i1] @ U[i1:j, i2:end]
                prune[:, j:end] = choose(j, end, current)
            w = W[:, j]
            if factors is None:  # the mask may have just changed
                err = torch.where(prune[:, j], w, 0.0) / U[j, j]
                W[:, j] = torch.where(prune[:, j], 0.0, w)
            else:  # err = w/U_jj where pruned; the pruned entry set to zero
                err = w * factors[0][:, j]
                w.mul_(factors[1][:, j])
            W[:, j + 1 : i2].addr_(err, U[j, j + 1 : i2], alpha=-1.0)
            E[:, j - i1] = err
        W[:, i2:] -= E @ U[i1:i2, i2:]
        total += E.square().sum()
    return 0.5 * float(total)


def obs_sweep(
    weight: Tensor, factor: Tensor, prune: Tensor, *, block_size: int = 128
) -> tuple[Tensor, float]:
    """Prune a fixed set of entries by SparseGPT's column sweep (no mask selection).

    For ``j = 0 .. cols−1``: ``err = (w_j − q_j) / U_jj`` with ``q_j = w_j`` where kept and
    0 where pruned; ``w_j ← q_j``; ``w_k ← w_k − err · U_jk`` for ``k > j``. Updates past a
    block of ``block_size`` columns are applied once per block (same result up to rounding).

    Args:
        weight: ``[rows, cols]`` weights.
        factor: ``[cols, cols]`` upper Cholesky factor ``U`` of the inverse Hessian
            (:func:`inverse_hessian_factor`).
        prune: bool ``[rows, cols]``, True = prune.
        block_size: ``≥ 1`` columns per lazy-update block.

    Returns:
        ``(new weights, error)``: float64 ``[rows, cols]`` with the pruned entries exactly 0,
        and ``½ Σ err²``.

    Raises:
        ValueError: If the shapes disagree, ``prune`` is not bool or ``block_size < 1``.
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D [rows, cols], got shape {tuple(weight.shape)}.")
    cols = weight.shape[1]
    if tuple(factor.shape) != (cols, cols):
        raise ValueError(f"`factor` must be [{cols}, {cols}], got shape {tuple(factor.shape)}.")
    if prune.dtype != torch.bool or prune.shape != weight.shape:
        raise ValueError(
            f"`prune` must be a bool tensor shaped like `weight` {tuple(weight.shape)}, got "
            f"{prune.dtype} {tuple(prune.shape)}."
        )
    _check_block("block_size", block_size)
    W = weight.to(torch.float64).clone()
    U = factor.to(device=W.device, dtype=torch.float64)
    error = _sweep(W, U, prune.to(W.device).clone(), block_size, {}, None)
    return W, error


def _check_block(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


def _round_div(a: int, b: int) -> int:
    """``round(a / b)`` for integers ``a ≥ 0``, ``b > 0`` (halves up), exactly."""
    return (2 * a + b) // (2 * b)


def _window_counts(rooms: list[int], new: int) -> list[int]:
    """Split ``new ≤ Σ rooms`` prunes over windows in proportion to their room.

    Cumulative rounding: ``count_w = round(new·C_w/T) − round(new·C_{w−1}/T)`` with ``C_w``
    the cumulative room and ``T`` the total room, so the counts sum to ``new`` and each is
    at most its window's room.
    """
    total = sum(rooms)
    counts: list[int] = []
    cumulative, previous = 0, 0
    for room in rooms:
        cumulative += room
        current = _round_div(new * cumulative, total) if total else 0
        counts.append(min(current - previous, room))
        previous = current
    return counts


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    *,
    target: int,
    prunable_columns: int | None = None,
    pattern: NMPattern | None = None,
    block_size: int = 128,
    window: int = 128,
    relative_damping: float = 0.01,
) -> SparseGPTResult:
    """Prune one layer to exactly ``target`` pruned entries with SparseGPT.

    The damped inverse-Hessian factor ``U`` comes from :func:`inverse_hessian_factor`. The
    prunable columns ``[0, prunable_columns)`` are split into selection windows of
    ``window`` columns (of ``pattern.m`` columns with a pattern, one group per row). The
    ``R = target − already pruned`` new prunes are spread over the windows in proportion to
    their room (alive entries; with a pattern ``Σ_groups max(0, n − pruned in group)``) by
    cumulative rounding, so the total is exact. The columns are then swept left to right
    (see :func:`obs_sweep`); when a window's first column is reached, its new prunes are the
    alive entries with the lowest saliency ``w² / U_jj²`` of the current (corrected)
    weights, over all rows of the window together; with a pattern at most
    ``n − pruned`` per group. Entries already pruned stay pruned (a non-zero weight there is
    zeroed with the same OBS correction). Columns ``≥ prunable_columns`` are never pruned
    but receive the corrections.

    Args:
        weight: ``[rows, cols]`` floating weights.
        hessian: ``[cols, cols]`` symmetric PSD ``Σ x xᵀ`` of the layer inputs
            (:func:`input_hessian`; unnormalised is fine).
        keep: bool ``[rows, cols]`` current mask, False = already pruned.
        target: Total pruned entries in the prunable columns after the call, from the
            number already pruned there to that plus the room.
        prunable_columns: Columns ``< prunable_columns`` may be pruned; None = all.
        pattern: At most ``pattern.n`` pruned per ``pattern.m`` consecutive prunable
            columns of each row; at ``target = n · rows · prunable_columns / m`` exactly
            ``n`` in every group. Needs ``prunable_columns`` a multiple of ``m``.
        block_size: ``≥ 1`` columns per lazy-update block (speed only).
        window: ``≥ 1`` columns per mask-selection window (ignored with a pattern).
        relative_damping: ``λ = relative_damping · mean(diag H)`` added to ``diag H``.

    Returns:
        The new weights (input dtype), the final mask and the loss estimate.

    Raises:
        ValueError: On mismatched shapes, a non-bool ``keep``, ``target`` out of range,
            ``prunable_columns`` out of ``[1, cols]`` (or not a multiple of ``m``), groups
            already past ``n`` pruned, ``block_size``/``window < 1``, a negative
            ``relative_damping``, non-finite inputs, or a Hessian that stays singular.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"`weight` must be a 2-D floating tensor [rows, cols], got {weight.dtype} "
            f"{tuple(weight.shape)}."
        )
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"`hessian` must be [{cols}, {cols}] for a weight of shape {(rows, cols)}, got "
            f"{tuple(hessian.shape)}."
        )
    if keep.dtype != torch.bool or keep.shape != weight.shape:
        raise ValueError(
            f"`keep` must be a bool tensor shaped like `weight` {(rows, cols)}, got "
            f"{keep.dtype} {tuple(keep.shape)}."
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("`weight` has non-finite entries.")
    P = cols if prunable_columns is None else prunable_columns
    if isinstance(P, bool) or not isinstance(P, int) or not 1 <= P <= cols:
        raise ValueError(f"`prunable_columns` must be an integer in [1, {cols}], got {P!r}.")
    _check_block("block_size", block_size)
    _check_block("window", window)
    if pattern is not None and P % pattern.m:
        raise ValueError(
            f"`prunable_columns` ({P}) must be a multiple of `pattern` {pattern}'s group size "
            f"{pattern.m}."
        )
    width = pattern.m if pattern is not None else window
    device = weight.device
    prune = ~keep.to(device)
    starts = list(range(0, P, width))
    windows = {start: min(start + width, P) for start in starts}

    pruned_before = int(prune[:, :P].sum())
    if pattern is not None:
        per_group = prune[:, :P].reshape(rows, P // pattern.m, pattern.m).sum(-1)
        if bool((per_group > pattern.n).any()):
            raise ValueError(
                f"`keep` already has groups with more than {pattern.n} of {pattern.m} pruned, "
                f"which `pattern` {pattern} does not allow."
            )
        rooms = (pattern.n - per_group).sum(0).tolist()  # one group per row per window
    else:
        rooms = [int(prune[:, s:e].logical_not().sum()) for s, e in windows.items()]
    room = sum(rooms)
    if isinstance(target, bool) or not isinstance(target, int):
        raise ValueError(f"`target` must be an integer, got {target!r}.")
    if not pruned_before <= target <= pruned_before + room:
        raise ValueError(
            f"`target` must be in [{pruned_before}, {pruned_before + room}] (already pruned "
            f"to already pruned + room in the prunable columns), got {target}."
        )
    counts = dict(zip(starts, _window_counts(rooms, target - pruned_before), strict=True))

    U = inverse_hessian_factor(hessian.to(device), relative_damping=relative_damping)
    saliency_scale = U.diagonal().square()

    def choose(start: int, end: int, current: Tensor) -> Tensor:
        already = prune[:, start:end]
        count = counts[start]
        if count == 0:
            return already
        scores = current.square() / saliency_scale[start:end]
        scores = scores.masked_fill(already, math.inf)
        if pattern is not None:  # only the `cap` best alive entries of each group compete
            cap = pattern.n - already.sum(1, keepdim=True)
            ranks = scores.argsort(dim=1, stable=True).argsort(dim=1)
            scores = scores.masked_fill(ranks >= cap, math.inf)
        order = scores.flatten().argsort(stable=True)[:count]
        chosen = already.flatten().clone()
        chosen[order] = True
        return chosen.reshape(already.shape)

    W = weight.to(torch.float64).clone()
    error = _sweep(W, U, prune, block_size, windows, choose)
    W = torch.where(prune, 0.0, W)
    return SparseGPTResult(weight=W.to(weight.dtype), keep=~prune, error=error)


class InputHessian:
    """SparseGPT's curvature of one layer: ``H = Σ x xᵀ`` over its inputs, shared by every row.

    As an inverse curvature it is ``Q = I ⊗ (H + λI)⁻¹`` over the canonical matrix, with
    SparseGPT's dampening (:func:`damped_hessian`), so saliencies and OBS
    updates can be read from it; the pruning itself is SparseGPT's column sweep.

    Args:
        hessian: ``[d_in', d_in']`` (float64).
        shape: The canonical shape ``(d_out, d_in')``.
        relative_damping: λ relative to the mean of ``diag H`` (:func:`damped_hessian`).
    """

    def __init__(
        self, hessian: Tensor, shape: tuple[int, int], relative_damping: float = 0.01
    ) -> None:
        self.hessian = hessian
        self.shape = shape
        self.relative_damping = relative_damping

    @functools.cached_property
    def inverse(self) -> Tensor:
        """``(H + λI)⁻¹``, built on first use (SparseGPT's own sweep never needs it)."""
        damped = damped_hessian(self.hessian, relative_damping=self.relative_damping)
        root = damped_inverse_root(damped, 0.0)
        inverse: Tensor = root @ root.transpose(-1, -2)
        return inverse

    def qv(self, V: Tensor) -> Tensor:
        """``V (H + λI)⁻¹`` for ``V`` of shape ``[..., d_out, d_in']``."""
        out: Tensor = (V.to(self.inverse.dtype) @ self.inverse).to(V.dtype)
        return out

    def sub_blocks(self, index: Tensor) -> Tensor:
        """``Q[index[g, a], index[g, b]]``: ``(H + λI)⁻¹`` entries within a row, 0 across rows."""
        width = self.shape[1]
        rows, cols = index // width, index % width
        values = self.inverse[cols.unsqueeze(-1), cols.unsqueeze(-2)]
        same = rows.unsqueeze(-1) == rows.unsqueeze(-2)
        return torch.where(same, values, torch.zeros_like(values))

    def diag_q(self) -> Tensor:
        """``diag`` of ``(H + λI)⁻¹``, repeated for every row: ``[d_out, d_in']``."""
        diag: Tensor = self.inverse.diagonal().to(torch.float32)
        return diag.expand(self.shape[0], -1).clone()
