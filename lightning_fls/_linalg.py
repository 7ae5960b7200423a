"""Batched small-matrix linear algebra that uses the CPU cores and memory well.

On CPU, torch runs batched ``cholesky``/``cholesky_inverse``/``solve`` as a loop of LAPACK
calls, each multi-threaded: for tens of thousands of 50×50 blocks the per-call threading
overhead dominates when the cores are busy (measured up to 150× slower than single-threaded
calls). And elementwise work on a whole ``[57 000, 50, 50]`` float64 stack is bound by memory
traffic and page faults. :func:`batched` runs a function over sub-chunks of the batch (a few
MB each, so intermediates stay in cache) on one thread per core with single-threaded kernels,
writing into one preallocated output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

_MIN_BATCH = 64
_lock = threading.Lock()


def batched(fn: Callable[..., Tensor], *tensors: Tensor, chunk: int = 1024) -> Tensor:
    """``fn(*tensors)`` for tensors batched along dim 0, in sub-chunks across the CPU cores.

    Args:
        fn: A function of batched tensors that treats the batch entries independently and
            returns one tensor batched the same way.
        tensors: Inputs with the same leading (batch) dimension.
        chunk: Batch entries per call of ``fn``.

    Returns:
        A tensor equal to ``fn(*tensors)``.
    """
    batch = tensors[0].shape[0]
    if tensors[0].device.type != "cpu" or batch < _MIN_BATCH:
        return fn(*tensors)
    with _lock:  # torch's thread setting is process-wide: one batched call at a time
        threads = max(1, torch.get_num_threads())
        torch.set_num_threads(1)
        try:
            first = fn(*(t[:chunk] for t in tensors))
            out = first.new_empty((batch, *first.shape[1:]))
            out[: first.shape[0]] = first

            def work(start: int) -> None:
                stop = min(start + chunk, batch)
                out[start:stop] = fn(*(t[start:stop] for t in tensors))

            starts = range(first.shape[0], batch, chunk)
            if threads == 1:
                for start in starts:
                    work(start)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    list(pool.map(work, starts))
        finally:
            torch.set_num_threads(threads)
    return out
