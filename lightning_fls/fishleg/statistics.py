"""Gradient statistics of a layer, gathered over batches, used to initialise curvature blocks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_fls._validation import check_fraction
from lightning_fls.layers.gradients import (
    REDUCED_PRECISION_MIN_ROWS,
    ExampleGradients,
    OuterProductGradients,
    gram_matrix,
)

STATISTICS_FIELDS = frozenset({"in_cov", "out_cov", "diag_fisher", "block_fisher"})
"""Names of the statistics a block may ask for."""
KRONECKER_PRODUCT_ROWS = 512
"""Most rows of ``Σ a aᵀ`` or ``Σ g gᵀ`` gathered over consecutive batches before a product.

Measured on this machine (2 cores, AVX-512 BF16), ``rowsᵀ rows`` of side 3072 ran at 127, 195,
266 and 315 GFLOP/s in bfloat16 over 128, 256, 512 and 1024 rows (94–158 in float32), and at
side 769 at 310–361 whatever the rows: the narrow products' sums stay in cache."""


def product_rows(side: int) -> int:
    """Rows a Kronecker product of side ``d`` waits for: ``min(512, max(1, d // 4))``.

    At most a quarter of the side, so that the rows waiting (``< rows + one batch's``) take
    about a quarter of the sum they go into, and never more than
    :data:`KRONECKER_PRODUCT_ROWS`.
    """
    return min(KRONECKER_PRODUCT_ROWS, max(1, side // 4))


MASKED_STATISTICS = frozenset({"diag_fisher", "block_fisher"})
"""The statistics that :meth:`StatisticsAccumulator.update`'s ``mask`` restricts."""


@dataclass
class LayerStatistics:
    """Running means of a layer's gradient statistics.

    Attributes:
        in_cov: ``Ā``, mean outer product of layer inputs (bias column included),
            ``[d_in', d_in']``.
        out_cov: ``Ḡ``, mean over examples of ``Σ_t g gᵀ`` for per-example output gradients,
            ``[d_out, d_out]``. ``Ḡ ⊗ Ā`` is the K-FAC approximation of F.
        diag_fisher: Diagonal of the Fisher, ``(1/B) Σ_b G_b ⊙ G_b``, ``[d_out, d_in']``.
        block_fisher: Diagonal blocks of the Fisher over ``vec(G)``, ``[num_blocks, B, B]``
            (see :meth:`~lightning_fls.layers.ExampleGradients.block_fisher`).
        num_examples: Number of examples averaged.
        owned: Whether the tensors belong to the receiver, which may overwrite them (a block
            then factorises ``block_fisher`` in place instead of copying it).
    """

    in_cov: Tensor | None = None
    out_cov: Tensor | None = None
    diag_fisher: Tensor | None = None
    block_fisher: Tensor | None = None
    num_examples: int = 0
    owned: bool = False


class StatisticsAccumulator:
    """Averages :class:`LayerStatistics` over batches of per-example gradients.

    Args:
        needs: Which statistics to gather (a subset of ``{"in_cov", "out_cov", "diag_fisher",
            "block_fisher"}``).
        block_size: Block size of ``block_fisher``.
        product_dtype: Dtype of the matrix products of ``in_cov`` and ``out_cov`` where every
            batch multiplied had at least
            :data:`~lightning_fls.layers.gradients.REDUCED_PRECISION_MIN_ROWS` rows (None: the
            gradients' own). The running sums stay in the gradients' dtype. The rows of
            consecutive small batches are multiplied together (:func:`product_rows`).
        token_fraction: Fraction of each example's positions (tokens, conv output pixels)
            whose outer products enter ``in_cov`` and ``out_cov``, in ``(0, 1]``: a fresh
            uniform draw per batch, the sums scaled to stay unbiased.
        seed: Seed of the draws of kept positions. Each accumulator draws from its own
            generator, so a layer sees the same positions for the same batches in the same
            order whichever other layers are gathered beside it.

    Raises:
        ValueError: If ``needs`` names an unknown statistic or ``token_fraction`` is not in
            ``(0, 1]``.
    """

    def __init__(
        self,
        needs: Iterable[str],
        *,
        block_size: int = 50,
        product_dtype: torch.dtype | None = None,
        token_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.needs = frozenset(needs)
        self.block_size = block_size
        self.product_dtype = product_dtype
        self.token_fraction = check_fraction("token_fraction", token_fraction)
        self._generator: torch.Generator | None = None
        if self.token_fraction < 1:
            self._generator = torch.Generator().manual_seed(seed)
        unknown = self.needs - STATISTICS_FIELDS
        if unknown:
            raise ValueError(
                f"`needs` has unknown statistics {sorted(unknown)}; "
                f"accepted: {sorted(STATISTICS_FIELDS)}."
            )
        self._sums: dict[str, Tensor] = {}
        self._rows: dict[str, list[Tensor]] = {}  # Kronecker rows waiting to be multiplied
        self._reduced: dict[str, bool] = {}  # whether every batch waiting takes product_dtype
        self._count = 0

    def expected_bytes(self, shape: tuple[int, int], element_size: int = 4) -> int:
        """Memory the statistics of a layer of canonical ``shape`` ``[d_out, d_in']`` will hold.

        ``block_fisher``: ``⌈n/B⌉·B²`` entries (``n = d_out·d_in'``), the size of the
        block-diagonal λ they are factorised into; ``diag_fisher``: ``n``; ``in_cov``:
        ``d_in'²``; ``out_cov``: ``d_out²``.

        Args:
            shape: The layer's canonical shape.
            element_size: Bytes per entry (4: float32).

        Returns:
            The bytes.
        """
        d_out, d_in = shape
        n = d_out * d_in
        entries = {
            "block_fisher": -(-n // self.block_size) * self.block_size**2,
            "diag_fisher": n,
            "in_cov": d_in * d_in,
            "out_cov": d_out * d_out,
        }
        return element_size * sum(entries[name] for name in self.needs)

    def update(self, grads: ExampleGradients, *, mask: Tensor | None = None) -> None:
        """Fold one batch of per-example gradients into the running means.

        Args:
            grads: Per-example gradients of the layer for one batch.
            mask: Optional 0/1 mask of surviving weights ``[d_out, d_in']``: the diagonal and
                block statistics then describe the Fisher restricted to them.

        Raises:
            TypeError: If Kronecker statistics are needed but ``grads`` has no factors.
        """
        batch = grads.batch_size
        sums = self._sums
        if self.needs & {"in_cov", "out_cov"}:
            if not isinstance(grads, OuterProductGradients):
                raise TypeError(
                    "Kronecker statistics need per-example gradients kept as input/output-gradient "
                    f"factors (OuterProductGradients), got {type(grads).__name__}."
                )
            rows = grads.kronecker_rows(
                token_fraction=self.token_fraction, generator=self._generator
            )
            reduced = self.takes_reduced_products(grads)
            self._buffer("in_cov", rows.inputs, rows.input_divisor, reduced)
            self._buffer("out_cov", rows.output_grads, rows.output_divisor, reduced)
        if "diag_fisher" in self.needs:
            diag = grads.diagonal()
            self._add("diag_fisher", diag if mask is None else diag * mask, batch)
        if "block_fisher" in self.needs:
            # Sums straight into the running total: the blocks are as large as λ itself.
            if "block_fisher" not in sums:
                blocks = -(-grads.shape[0] * grads.shape[1] // self.block_size)
                probe = grads.materialise(0, 1)
                sums["block_fisher"] = probe.new_zeros(blocks, self.block_size, self.block_size)
            grads.block_fisher(self.block_size, mask, out=sums["block_fisher"])
        self._count += batch

    def takes_reduced_products(self, grads: OuterProductGradients) -> bool:
        """Whether this batch's Kronecker rows are multiplied in :attr:`product_dtype`.

        True where a ``product_dtype`` is set and the batch had at least
        :data:`~lightning_fls.layers.gradients.REDUCED_PRECISION_MIN_ROWS` rows (``B·T``)
        before any positions were drawn.
        """
        rows = int(grads.inputs.shape[0] * grads.inputs.shape[1])
        return self.product_dtype is not None and rows >= REDUCED_PRECISION_MIN_ROWS

    def _buffer(self, name: str, rows: Tensor, divisor: float, reduced: bool) -> None:
        """Add a batch's ``rowsᵀ rows / divisor``, multiplying small batches' rows together.

        A product over fewer rows than :func:`product_rows` runs far below the machine's rate
        on wide factors, and each is followed by a ``d²`` addition to the running sum. Such
        rows wait, scaled by ``1/√divisor``, until enough have come from consecutive batches
        (or :meth:`result` is called), and are multiplied together.
        """
        needed = product_rows(rows.shape[1])
        if name not in self._rows and len(rows) >= needed:  # large enough alone
            product = gram_matrix(rows, self.product_dtype if reduced else None)
            self._add(name, product if divisor == 1 else product.div_(divisor))
            return
        waiting = self._rows.setdefault(name, [])
        # A fresh tensor either way: the records may be views of buffers reused later.
        waiting.append(rows * (1 / math.sqrt(divisor)) if divisor != 1 else rows.clone())
        self._reduced[name] = self._reduced.get(name, True) and reduced
        if sum(len(r) for r in waiting) >= needed:
            self._flush(name)

    def _flush(self, name: str) -> None:
        waiting = self._rows.pop(name, None)
        if not waiting:
            return
        reduced = self._reduced.pop(name, False)
        rows = waiting[0] if len(waiting) == 1 else torch.cat(waiting)
        waiting.clear()
        product = gram_matrix(rows, self.product_dtype if reduced else None)
        del rows
        self._add(name, product)

    def _add(self, name: str, value: Tensor, weight: int = 1) -> None:
        """Add ``weight·value`` to the running sum ``name`` (kept as is when it starts it)."""
        if name in self._sums:
            self._sums[name].add_(value, alpha=weight)
        else:
            self._sums[name] = value if weight == 1 else value * weight

    def result(self, *, release: bool = False) -> LayerStatistics:
        """The statistics gathered so far.

        Args:
            release: Turn the running sums into the means in place and forget them (no copy;
                the accumulator is empty afterwards).

        Returns:
            The running means.

        Raises:
            RuntimeError: If no batch was seen.
        """
        if self._count == 0:
            raise RuntimeError("No batch was given to the statistics accumulator.")
        for name in list(self._rows):
            self._flush(name)
        if release:
            means = {name: total.div_(self._count) for name, total in self._sums.items()}
            count, self._sums, self._count = self._count, {}, 0
            return _statistics(means, count, owned=True)
        means = {name: total / self._count for name, total in self._sums.items()}
        return _statistics(means, self._count, owned=False)


def _statistics(means: dict[str, Tensor], count: int, *, owned: bool) -> LayerStatistics:
    return LayerStatistics(
        in_cov=means.get("in_cov"),
        out_cov=means.get("out_cov"),
        diag_fisher=means.get("diag_fisher"),
        block_fisher=means.get("block_fisher"),
        num_examples=count,
        owned=owned,
    )
