"""Data-parallel helpers: every rank's recorded per-example gradients, in one global order.

Under DDP each rank records the per-example gradients of its own share of every global batch.
:func:`gather_records` hands every rank the union, arranged as a single process would have
recorded the same global batches (rank 0's examples of a batch, then rank 1's, …), so the
curvature estimate, and with it every pruning decision, is the one a single process makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from lightning_fls.layers import DenseGradients, ExampleGradients, OuterProductGradients

Record = dict[str, ExampleGradients]
# Per record, per layer: (key, kind, [(shape, dtype) of each part]).
_Meta = list[list[tuple[str, str, list[tuple[tuple[int, ...], torch.dtype]]]]]
_KINDS: dict[str, type[ExampleGradients]] = {
    cls.__name__: cls for cls in (OuterProductGradients, DenseGradients)
}


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def concatenate(records: Sequence[Record]) -> Record:
    """One record holding the examples of ``records`` in order, layer by layer.

    Args:
        records: Non-empty; each maps the same layer keys to gradients of the same kind.

    Returns:
        ``{key: gradients}`` with ``Σ batch_size`` examples per layer.
    """
    first = records[0]
    if len(records) == 1:
        return dict(first)
    joined: Record = {}
    for key, grads in first.items():
        parts = zip(*(record[key].parts() for record in records), strict=True)
        joined[key] = type(grads).from_parts(tuple(torch.cat(list(p)) for p in parts))
    return joined


def gather_records(records: Sequence[Record], device: torch.device) -> list[Record]:
    """Every rank's records, position by position (a collective: every rank must call it).

    Record ``i`` of the result joins the ``i``-th record of rank 0, rank 1, … (a rank with fewer
    records contributes nothing to the later positions). All tensors travel in one
    ``all_gather`` of a flat buffer of the widest dtype present, so the values arrive exactly.

    Args:
        records: This rank's records, oldest first.
        device: Where the buffer lives (the model's device: CPU for gloo, CUDA for NCCL).

    Returns:
        The joined records, identical on every rank. Without a process group: ``records``.
    """
    if not is_distributed():
        return list(records)
    world = dist.get_world_size()
    meta: _Meta = [
        [
            (key, type(g).__name__, [(tuple(t.shape), t.dtype) for t in g.parts()])
            for key, g in r.items()
        ]
        for r in records
    ]
    unknown = {kind for r in meta for _, kind, _ in r} - set(_KINDS)
    if unknown:
        raise TypeError(
            f"Cannot send per-example gradients of kind {sorted(unknown)} between ranks."
        )
    metas: list[_Meta | None] = [None] * world
    dist.all_gather_object(metas, meta)
    dtypes = [dtype for m in metas for rec in m or [] for _, _, parts in rec for _, dtype in parts]
    if not dtypes:
        return []
    wide = dtypes[0]
    for dtype in dtypes[1:]:
        wide = torch.promote_types(wide, dtype)
    sizes = [
        sum(_numel(shape) for rec in m or [] for _, _, parts in rec for shape, _ in parts)
        for m in metas
    ]
    flat = torch.zeros(max(sizes), dtype=wide, device=device)
    local = [t.reshape(-1) for r in records for g in r.values() for t in g.parts()]
    if local:
        flat[: sizes[dist.get_rank()]] = torch.cat([t.to(device=device, dtype=wide) for t in local])
    buffers = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(buffers, flat)

    per_rank: list[list[Record]] = []
    for rank, m in enumerate(metas):
        offset, rank_records = 0, []
        for layers in m or []:
            record: Record = {}
            for key, kind, shapes in layers:
                parts = []
                for shape, dtype in shapes:
                    n = _numel(shape)
                    parts.append(buffers[rank][offset : offset + n].reshape(shape).to(dtype))
                    offset += n
                record[key] = _KINDS[kind].from_parts(tuple(parts))
            rank_records.append(record)
        per_rank.append(rank_records)
    longest = max(len(r) for r in per_rank)
    return [concatenate([r[i] for r in per_rank if i < len(r)]) for i in range(longest)]


def sum_across_ranks(value: int, device: torch.device) -> int:
    """``value`` summed over all ranks (a collective); ``value`` itself without a group."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def mean_across_ranks(value: float, device: torch.device) -> float:
    """``value`` averaged over all ranks (a collective); ``value`` itself without a group."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
