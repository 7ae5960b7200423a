r"""Structured OBS: the saliency of removing whole units, where their entries lie in Q.

A unit ``u`` of a :class:`~lightning_fls.structured.GroupFamily` owns a set ``S_u`` of entries
of the canonical matrices ``[d_out, d_in']`` of one or more layers (a producer's row with its
bias, the consumers' matching columns). Removing it costs, to second order (Hassibi & Stork's
group form of OBS),

.. math::

    \rho_u = \tfrac12\, w_{S_u}^\top ([Q]_{S_u S_u})^{-1} w_{S_u},

summed over the layers, since Q is block-diagonal across layers. Within a layer, Q is
block-diagonal for the ``fls`` default too (blocks of ``B`` consecutive entries of ``vec W``),
so ``[Q]_{SS}`` splits into the pieces of ``S`` inside each block and the cost is a sum of
small solves, computed exactly here. A Kronecker Q, ``c · G_o ⊗ G_i``, is exact for units
owning whole rows or whole columns (``[Q]_SS = c · G_o[R,R] ⊗ G_i``). For any other estimate only
``diag Q`` is used (sum of single-weight saliencies): exact for diagonal estimates (diagonal
Fisher) and for magnitude, where it is half the group's squared norm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_fls._linalg import spd_solve
from lightning_fls.layers import LayerAdapter
from lightning_fls.masks import prune_lowest
from lightning_fls.obs import BlockCurvature, InverseCurvature, KroneckerCurvature
from lightning_fls.structured.groups import GroupFamily

_CHUNK_ENTRIES = 2**22
"""Sub-matrix entries solved per batch (32 MB of float64)."""


@dataclass(frozen=True)
class UnitLayout:
    """Where each unit of a family lies in the canonical matrices of the pruned layers.

    Attributes:
        family: The family.
        positions: ``{layer key: int64 [units, k]}``, the flat canonical positions
            (row-major in ``[d_out, d_in']``) each unit owns in that layer.
    """

    family: GroupFamily
    positions: dict[str, Tensor]

    @property
    def units(self) -> int:
        """Number of units."""
        return self.family.units


def unit_layouts(
    model: nn.Module, layers: Mapping[str, LayerAdapter], families: Sequence[GroupFamily]
) -> tuple[list[UnitLayout], dict[str, str]]:
    """The canonical positions of every family whose members all lie in the pruned layers.

    Args:
        model: The model.
        layers: The pruned layers' adapters, keyed by weight name.
        families: From :func:`~lightning_fls.find_groups`.

    Returns:
        ``(layouts, skipped)``: a layout per family all of whose producer and consumer members
        are parameters of pruned layers, and ``{family name: reason}`` for the others.
    """
    names = {id(module): name for name, module in model.named_modules()}
    owner: dict[str, tuple[str, str]] = {}  # parameter FQN -> (layer key, attribute)
    for key, adapter in layers.items():
        prefix = names.get(id(adapter.module), "")
        for attribute in adapter.parameter_names:
            owner[f"{prefix}.{attribute}" if prefix else attribute] = (key, attribute)
    layouts: list[UnitLayout] = []
    skipped: dict[str, str] = {}
    canonical: dict[tuple[str, str], Tensor] = {}
    for family in families:
        outside = [m.parameter for m in family.members
                   if m.role != "passive" and m.parameter not in owner]  # fmt: skip
        if outside:
            skipped[family.name] = f"{outside} are not pruned (see `include`/`exclude`)"
            continue
        positions: dict[str, list[Tensor]] = {}
        for member in family.members:
            if member.role == "passive":
                continue
            key, attribute = owner[member.parameter]
            if (key, attribute) not in canonical:
                canonical[key, attribute] = layers[key].canonical_positions(attribute)
            where = canonical[key, attribute]
            index = member.indices.reshape(-1).to(where.device)
            picked = where.index_select(member.dim, index).movedim(member.dim, 0)
            positions.setdefault(key, []).append(picked.reshape(family.units, -1))
        layouts.append(
            UnitLayout(family, {k: torch.cat(v, dim=1).cpu() for k, v in positions.items()})
        )
    return layouts, skipped


def unit_saliencies(
    layout: UnitLayout,
    weights: Mapping[str, Tensor],
    curvature: Mapping[str, InverseCurvature],
) -> Tensor:
    """``ρ_u = ½ Σ_layers w_Sᵀ ([Q]_SS)⁻¹ w_S`` for every unit of a family.

    Exact inside the diagonal blocks of a block-diagonal Q
    (:class:`~lightning_fls.obs.BlockCurvature`) and, for units of whole rows or columns, for a
    Kronecker Q (:class:`~lightning_fls.obs.KroneckerCurvature`); from ``diag Q`` alone for
    other estimates.

    Args:
        layout: The family's positions.
        weights: Canonical weights ``[d_out, d_in']`` by layer key.
        curvature: Each layer's estimate by layer key.

    Returns:
        float64 ``[units]``.
    """
    total = torch.zeros(layout.units, dtype=torch.float64)
    for key, positions in layout.positions.items():
        w = weights[key].detach().reshape(-1).to(torch.float64)
        estimate = curvature[key]
        factors = estimate.kronecker_factors() if isinstance(estimate, KroneckerCurvature) else None
        exact = None
        if factors is not None:
            exact = _kronecker_saliencies(weights[key].detach(), *factors, positions)
        if exact is not None:
            total += exact
        elif isinstance(estimate, BlockCurvature):
            total += _block_saliencies(w, estimate, positions)
        else:
            diag = estimate.diag_q().reshape(-1).to(torch.float64).cpu()
            q = diag.clamp_min(torch.finfo(torch.float64).tiny)
            flat = positions.reshape(-1)
            total += (w.cpu()[flat].square() / (2 * q[flat])).reshape(positions.shape).sum(1)
    return total


def _block_saliencies(w: Tensor, estimate: BlockCurvature, positions: Tensor) -> Tensor:
    """Per unit, ``Σ_blocks ½ w_pᵀ (Q_b[p, p])⁻¹ w_p`` over the pieces ``p`` in each block."""
    blocks, size = estimate.block_matrices()
    units, k = positions.shape
    device = blocks.device
    flat = positions.reshape(-1).to(device)
    unit = torch.arange(units, device=device).repeat_interleave(k)
    block = flat // size
    # Pieces: consecutive entries of one unit in one block (positions ascend within a unit).
    order = torch.argsort(unit * (blocks.shape[0] + 1) + block, stable=True)
    flat, unit, block = flat[order], unit[order], block[order]
    new_piece = torch.ones_like(flat, dtype=torch.bool)
    new_piece[1:] = (unit[1:] != unit[:-1]) | (block[1:] != block[:-1])
    piece = torch.cumsum(new_piece, 0) - 1
    starts = new_piece.nonzero().squeeze(-1)
    rank = torch.arange(flat.numel(), device=device) - starts[piece]
    pieces = int(starts.numel())
    width = int(rank.max()) + 1
    offset = torch.zeros(pieces, width, dtype=torch.long, device=device)
    values = torch.zeros(pieces, width, dtype=torch.float64, device=device)
    inside = torch.zeros(pieces, width, dtype=torch.float64, device=device)
    offset[piece, rank] = flat % size
    values[piece, rank] = w.to(device)[flat]
    inside[piece, rank] = 1.0
    piece_block = block[starts]
    piece_unit = unit[starts]
    result = torch.zeros(units, dtype=torch.float64, device=device)
    step = max(1, _CHUNK_ENTRIES // (width * width))
    for first in range(0, pieces, step):
        part = slice(first, first + step)
        rows = offset[part]
        Q = blocks[piece_block[part, None, None], rows[:, :, None], rows[:, None, :]]
        mask = inside[part]
        system = Q.to(torch.float64) * mask[:, :, None] * mask[:, None, :]
        system.diagonal(dim1=-2, dim2=-1).add_(1.0 - mask)  # identity on the padding
        rhs = values[part].unsqueeze(-1)
        solved = spd_solve(system, rhs)
        cost = 0.5 * (rhs * solved).sum((1, 2))
        result.index_add_(0, piece_unit[part], cost)
    return result.cpu()


def _kronecker_saliencies(
    weight: Tensor, out_gram: Tensor, in_gram: Tensor, scale: float, positions: Tensor
) -> Tensor | None:
    """Exact unit costs for ``Q = c · G_o ⊗ G_i`` when every unit owns whole rows or columns.

    Whole rows ``R``: ``[Q]_SS = c · G_o[R,R] ⊗ G_i``, so
    ``ρ = (1/2c) tr(W_Rᵀ G_o[R,R]⁻¹ W_R G_i⁻¹)``; whole columns ``C``:
    ``ρ = (1/2c) tr(W_Cᵀ G_o⁻¹ W_C G_i[C,C]⁻¹)``. None for any other shape of unit.
    """
    d_out, d_in = weight.shape
    units, k = positions.shape
    ordered = positions.sort(dim=1).values
    rows, cols = ordered // d_in, ordered % d_in
    W = weight.to(torch.float64).cpu()
    G_o, G_i = out_gram.to(torch.float64).cpu(), in_gram.to(torch.float64).cpu()
    if k % d_in == 0:
        r = k // d_in
        grid_rows, grid_cols = rows.reshape(units, r, d_in), cols.reshape(units, r, d_in)
        if bool((grid_cols == torch.arange(d_in)).all()) and bool(
            (grid_rows == grid_rows[:, :, :1]).all()
        ):
            R = grid_rows[:, :, 0]  # [U, r]
            W_R = W[R]  # [U, r, d_in]
            left = spd_solve(G_o[R.unsqueeze(-1), R.unsqueeze(-2)], W_R)
            right = spd_solve(G_i, W_R.reshape(-1, d_in).T).T.reshape(W_R.shape)
            return 0.5 / scale * (left * right).sum((1, 2))
    if k % d_out == 0:
        r = k // d_out
        grid_rows, grid_cols = rows.reshape(units, d_out, r), cols.reshape(units, d_out, r)
        if bool((grid_rows == torch.arange(d_out)[:, None]).all()) and bool(
            (grid_cols == grid_cols[:, :1, :]).all()
        ):
            C = grid_cols[:, 0, :]  # [U, r]
            W_C = W[:, C].permute(1, 0, 2)  # [U, d_out, r]
            left = spd_solve(G_o, W_C.permute(1, 0, 2).reshape(d_out, -1))
            left = left.reshape(d_out, units, r).permute(1, 0, 2)
            right = spd_solve(G_i[C.unsqueeze(-1), C.unsqueeze(-2)], W_C.transpose(1, 2))
            return 0.5 / scale * (left * right.transpose(1, 2)).sum((1, 2))
    return None


def unit_entries(layout: UnitLayout, chosen: Tensor) -> dict[str, Tensor]:
    """Flat canonical positions of the chosen units' entries, by layer key.

    Args:
        layout: The family's positions.
        chosen: bool ``[units]``.

    Returns:
        ``{layer key: int64 positions}``.
    """
    return {key: positions[chosen].reshape(-1) for key, positions in layout.positions.items()}


@dataclass
class StructuredUnits:
    """The families being pruned by units, and which of their units are removed so far.

    Attributes:
        layouts: One per family (:func:`unit_layouts`).
        removed: bool ``[units]`` per layout, True for a removed unit.
    """

    layouts: list[UnitLayout]
    removed: list[Tensor]

    def layer_keys(self) -> list[str]:
        """The pruned layers some family touches, in first-seen order."""
        return list(dict.fromkeys(key for layout in self.layouts for key in layout.positions))

    def entries(self, chosen: Sequence[Tensor]) -> dict[str, Tensor]:
        """Flat canonical positions of the chosen units' entries (one flag tensor per layout).

        Returns:
            ``{layer key: int64 positions}`` for every layer some family touches.
        """
        parts: dict[str, list[Tensor]] = {key: [] for key in self.layer_keys()}
        for layout, flags in zip(self.layouts, chosen, strict=True):
            for key, positions in unit_entries(layout, flags).items():
                parts[key].append(positions)
        return {key: torch.cat(p) if p else torch.zeros(0, dtype=torch.long)
                for key, p in parts.items()}  # fmt: skip

    def caps(self, max_layer_sparsity: float | None) -> list[int | None]:
        """Most units each family may lose: all but one, and at most ``max_layer_sparsity``."""
        cap = 1.0 if max_layer_sparsity is None else max_layer_sparsity
        return [min(lay.units - 1, math.floor(cap * lay.units)) for lay in self.layouts]

    def check_reachable(self, sparsity: float, max_layer_sparsity: float | None) -> None:
        """Raise if removing ``sparsity`` of the units would empty a layer (or pass a cap).

        Raises:
            ValueError: Naming the most units that can go, and why.
        """
        total = sum(layout.units for layout in self.layouts)
        room = sum(c or 0 for c in self.caps(max_layer_sparsity))
        if round(sparsity * total) > room:
            why = "every layer keeps at least one unit"
            if max_layer_sparsity is not None:
                why += f" and loses at most max_layer_sparsity={max_layer_sparsity:g} of them"
            raise ValueError(
                f"`sparsity` {sparsity:g} of the units would empty a layer: at most {room} of "
                f"the {total} units can be removed ({room / total:.4g}), since {why}."
            )

    def fraction_removed(self) -> float:
        """Removed units over all units."""
        total = sum(layout.units for layout in self.layouts)
        return sum(int(r.sum()) for r in self.removed) / total if total else 0.0


def select_units(
    saliency: Sequence[Tensor], kept: Sequence[Tensor], caps: Sequence[int | None], target: float
) -> list[Tensor]:
    """Keep-flags removing the least salient units over all families up to ``target``.

    Ranking is global, ties by family then unit; removed units stay removed; family ``i``
    has at most ``caps[i]`` units removed.

    Args:
        saliency: float ``[units]`` per family.
        kept: bool ``[units]`` per family, True for a unit still there.
        caps: Most units removed per family (None: no cap).
        target: Fraction of all units to have removed, in ``[0, 1)``.

    Returns:
        The new keep-flags.

    Raises:
        ValueError: If the caps leave too few units to reach ``target``.
    """
    return prune_lowest(list(saliency), list(kept), list(caps), target)
