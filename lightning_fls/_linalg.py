"""Batched small-matrix linear algebra that uses the CPU cores well.

On CPU, torch runs batched ``cholesky``/``cholesky_inverse``/``solve`` as a loop of LAPACK
calls, each multi-threaded. For tens of thousands of 50×50 blocks the per-call threading
overhead dominates (measured up to 100× slower than single-threaded calls when the cores are
busy). :func:`batched` instead splits the batch into one contiguous chunk per core and runs
each chunk on its own thread with single-threaded kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

_MIN_BATCH = 64
_lock = threading.Lock()


def batched(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` for tensors batched along dim 0, split across the CPU cores.

    Args:
        fn: A function of batched tensors that treats the batch entries independently.
        tensors: Inputs with the same leading (batch) dimension.

    Returns:
        The results concatenated along dim 0 (identical to ``fn(*tensors)``).
    """
    batch = tensors[0].shape[0]
    if tensors[0].device.type != "cpu" or batch < _MIN_BATCH:
        return fn(*tensors)
    threads = max(1, torch.get_num_threads())
    chunks = [list(t.tensor_split(threads)) for t in tensors]
    with _lock:  # torch's thread setting is process-wide: one batched call at a time
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if threads == 1:
                return fn(*tensors)
            with ThreadPoolExecutor(max_workers=threads) as pool:
                parts = list(pool.map(lambda i: fn(*(c[i] for c in chunks)), range(threads)))
        finally:
            torch.set_num_threads(previous)
    return torch.cat(parts)
