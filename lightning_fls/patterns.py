"""N:M semi-structured sparsity patterns: parsing, the group layout, and checks.

A pattern ``"N:M"`` prunes **N of every M consecutive weights** along a weight's input
dimension (its sparsity is ``N/M``), as SparseGPT's ``prunen:prunem``. For ``"2:4"`` and
``"4:8"``, the patterns GPUs accelerate, this is also NVIDIA's reading (*at most 2 non-zeros in
every 4*). Groups run along each output row of the weight seen as a matrix
``[d_out, d_in]``: a Linear weight as it is, a convolution's kernel flattened to
``[c_out, c_in · kh · kw]`` (the layout ``torch.sparse.to_sparse_semi_structured`` expects),
a 1-D weight as one row. Biases are never pruned and form no groups.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_GROUP = 32
"""Largest accepted ``M``."""


@dataclass(frozen=True)
class NMPattern:
    """``n`` of every ``m`` consecutive weights pruned.

    Attributes:
        n: Weights pruned per group, ``0 < n < m``.
        m: Group size, ``2 ≤ m ≤ 32``.
    """

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        """The sparsity of a model that follows the pattern exactly, ``n/m``."""
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(value: str | NMPattern | None) -> NMPattern | None:
    """Read a pattern argument.

    Args:
        value: ``None`` (unstructured), an :class:`NMPattern`, or a string ``"N:M"`` with
            ``0 < N < M ≤ 32`` (e.g. ``"2:4"``).

    Returns:
        The pattern, or None.

    Raises:
        ValueError: If the string is not of that form.
    """
    if value is None or isinstance(value, NMPattern):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(value)) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"`pattern` must be None (unstructured) or a string 'N:M' such as '2:4' (N of every "
            f"M consecutive weights pruned), got {value!r}."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m <= MAX_GROUP:
        raise ValueError(
            f"`pattern` {value!r} needs 0 < N < M ≤ {MAX_GROUP} (N of every M weights pruned)."
        )
    return NMPattern(n, m)


def as_rows(tensor: Tensor) -> Tensor:
    """A weight-shaped tensor as the matrix its groups run along: ``[d_out, d_in]``.

    Args:
        tensor: Shaped like a weight (1-D weights are one row).

    Returns:
        A view ``[rows, columns]``.
    """
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def check_fits(name: str, shape: torch.Size | tuple[int, ...], pattern: NMPattern) -> None:
    """Refuse a weight whose rows do not split into groups of ``m``.

    Args:
        name: The weight's name, for the message.
        shape: Its shape.
        pattern: The pattern.

    Raises:
        ValueError: If the row length is not a multiple of ``m``.
    """
    columns = as_rows(torch.empty(shape, device="meta")).shape[1]
    if columns % pattern.m:
        raise ValueError(
            f"`pattern` {pattern} needs rows whose length is a multiple of {pattern.m}, but "
            f"`{name}` (shape {tuple(shape)}) has rows of {columns}; leave it out with "
            f"exclude=[{name!r}]."
        )


def pruned_per_group(mask: Tensor, pattern: NMPattern) -> Tensor:
    """How many entries of each group a mask prunes.

    Args:
        mask: Boolean, ``True`` = kept, shaped like the weight.
        pattern: The pattern.

    Returns:
        ``[rows, columns / m]`` counts.
    """
    rows = as_rows(mask)
    return (~rows).reshape(rows.shape[0], -1, pattern.m).sum(-1)


def follows_pattern(weight_or_mask: Tensor, pattern: NMPattern) -> bool:
    """Whether every group has at least ``n`` zeros (a weight) or pruned entries (a mask).

    Args:
        weight_or_mask: A weight (zeros count) or a boolean mask (``False`` counts).
        pattern: The pattern.

    Returns:
        True if the pattern holds everywhere.
    """
    mask = weight_or_mask if weight_or_mask.dtype == torch.bool else weight_or_mask != 0
    if as_rows(mask).shape[1] % pattern.m:
        return False
    return bool((pruned_per_group(mask, pattern) >= pattern.n).all())
