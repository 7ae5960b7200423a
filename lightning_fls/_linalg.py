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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

_MIN_BATCH = 64
DEFAULT_CHUNK = 64
"""Default batch entries per call of the function (64 of 50×50 float64 blocks: 1.3 MB).

Each call makes a handful of float64 temporaries of its batch's size on each worker thread.
With 256 such blocks per call (5 MB temporaries) the factorisation of one 50 MB layer's
statistics raised the peak resident memory by 130 MB, as the threads' malloc arenas kept the
freed temporaries; with 64 per call, by 35 MB, and no slower. Callers whose entries are much
smaller pass a larger ``chunk`` (:func:`chunk_for_side`)."""
CHUNK_BYTES = 2**20
"""The float64 working set per input that :func:`chunk_for_side` aims a call at."""


def chunk_for_side(side: int) -> int:
    """Batch entries per call for ``side × side`` float64 matrices: about 1 MB, at least 64."""
    return max(DEFAULT_CHUNK, CHUNK_BYTES // (8 * side * side))


_lock = threading.Lock()


def batched(
    fn: Callable[..., Tensor],
    *tensors: Tensor,
    chunk: int = DEFAULT_CHUNK,
    out: Tensor | None = None,
) -> Tensor:
    """``fn(*tensors)`` for tensors batched along dim 0, in sub-chunks across the CPU cores.

    Args:
        fn: A function of batched tensors that treats the batch entries independently and
            returns one tensor batched the same way.
        tensors: Inputs with the same leading (batch) dimension.
        chunk: Batch entries per call of ``fn`` (:data:`DEFAULT_CHUNK`).
        out: Where to write the result (it may be one of ``tensors``: each chunk is read
            before it is written), instead of a new tensor.

    Returns:
        A tensor equal to ``fn(*tensors)`` (``out`` when given).
    """
    batch = tensors[0].shape[0]
    if tensors[0].device.type != "cpu" or batch < _MIN_BATCH:
        result = fn(*tensors)
        if out is None:
            return result
        return out.copy_(result)
    with _lock:  # torch's thread setting is process-wide: one batched call at a time
        threads = max(1, torch.get_num_threads())
        torch.set_num_threads(1)
        try:
            first = fn(*(t[:chunk] for t in tensors))
            if out is None:
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


SUB_BLOCK_SIDES = (4, 8, 16, 32)
"""Sides that batched ``B × B`` problems are cut down to when only some coordinates matter."""


def sub_problems(member: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Rows of ``member`` grouped by the smallest side that holds their ``True`` entries.

    The batched small factorisations and solves cost per matrix, and that cost falls with the
    side; a problem that involves only some coordinates of its block is solved on the first
    side in :data:`SUB_BLOCK_SIDES` (below ``B``), or ``B``, that holds them.

    Args:
        member: Boolean ``[k, B]``, the coordinates each problem involves.

    Yields:
        ``(rows [r], index [r, s])`` for each side ``s`` with at least one row: the rows of
        ``member`` solved on that side and, per row, its member positions first (in order),
        then others to fill the side. Rows with no member go with the smallest side.
    """
    size = member.shape[-1]
    counts = member.sum(-1)
    order = torch.argsort((~member).to(torch.int8), dim=-1, stable=True)
    lower = -1
    for side in [*(s for s in SUB_BLOCK_SIDES if s < size), size]:
        rows = ((counts > lower) & (counts <= side)).nonzero().squeeze(-1)
        lower = side
        if rows.numel():
            yield rows, order[rows, :side]


# -- positive-definite factorisations that never fail ------------------------------------------

RELATIVE_EIGENVALUE_FLOOR = 1e-12
"""In a fallback, eigenvalues are floored at this fraction of the largest (float64)."""

_count_lock = threading.Lock()
_counters: list[FallbackCounter] = []


class FallbackCounter:
    """Counts the matrices that needed the eigenvalue fallback while the counter is active.

    Use as a context manager around factorisations (:func:`damped_inverse_root`,
    :func:`spd_solve`); counters nest, and each active one counts every fallback.

    Attributes:
        count: Matrices factorised through the fallback so far.
    """

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> FallbackCounter:
        with _count_lock:
            _counters.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _count_lock:
            _counters.remove(self)


def _record_fallbacks(count: int) -> None:
    with _count_lock:
        for counter in _counters:
            counter.count += count


def _floored(eigenvalues: Tensor, damping: float) -> Tensor:
    """``max(e, 0) + γ``, then at least :data:`RELATIVE_EIGENVALUE_FLOOR` of the largest."""
    shifted = eigenvalues.clamp_min(0.0) + damping
    floor = shifted.amax(-1, keepdim=True) * RELATIVE_EIGENVALUE_FLOOR
    return torch.maximum(shifted, floor.clamp_min(torch.finfo(shifted.dtype).tiny))


def _eigen(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and vectors of the symmetric part of ``[n, k, k]`` matrices."""
    result = torch.linalg.eigh(0.5 * (matrices + matrices.transpose(-1, -2)))
    return result.eigenvalues, result.eigenvectors


def _damped_cholesky(psd: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The float64 Cholesky factor of ``A + γI`` ``[n, d, d]`` and where it failed.

    One float64 copy of ``A``, factorised in place: at large sides the copies are what a
    factorisation costs in memory (four of them at ``d = 2049``, 128 MB, before).
    """
    d = psd.shape[-1]
    chol = psd.to(torch.float64, copy=True).reshape(-1, d, d)
    chol.diagonal(dim1=-2, dim2=-1).add_(damping)
    info = torch.empty(chol.shape[0], dtype=torch.int32, device=chol.device)
    torch.linalg.cholesky_ex(chol, out=(chol, info))
    return chol, info != 0


def _failed_matrices(psd: Tensor, failed: Tensor) -> Tensor:
    """The float64 ``A`` ``[k, d, d]`` of the matrices whose Cholesky failed."""
    d = psd.shape[-1]
    return psd.reshape(-1, d, d)[failed].to(torch.float64)


def _floored_eigen(A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Floored damped eigenvalues and eigenvectors of matrices whose Cholesky failed (counted)."""
    eigenvalues, vectors = _eigen(A)
    _record_fallbacks(A.shape[0])
    return _floored(eigenvalues, damping), vectors


TRIANGULAR_INVERSE_BASE = 256
"""Side at and below which :func:`lower_triangular_inverse` solves against the identity.

Above it, the matrix is split in halves and the off-diagonal block formed by two triangular
solves against ``L₂₁``, level-3 operations that run near the machine's matmul speed where one
solve against the whole identity (``d³`` operations, no use made of the result's zeros) does
not. At sides 769–3073 in float64: 1.6–1.9× faster than that solve with matrix products for
the off-diagonal block (``2d³/3`` operations), and 1.0–1.4× faster again with the solves
(``d³/3``), with the same residual ``‖X L − I‖`` (about 1e-15). 64, 128, 256 and 512 were
timed; none was better at every side."""


def lower_triangular_inverse(lower: Tensor) -> Tensor:
    r"""Inverse of lower triangular matrices, batched, by recursive halving.

    .. math::

        \begin{pmatrix} L_{11} & 0 \\ L_{21} & L_{22} \end{pmatrix}^{-1}
        = \begin{pmatrix} X_{11} & 0 \\ -L_{22}^{-1} (L_{21} L_{11}^{-1}) & X_{22} \end{pmatrix},
        \qquad X_{kk} = L_{kk}^{-1},

    with ``X₁₁`` and ``X₂₂`` found the same way down to :data:`TRIANGULAR_INVERSE_BASE`, and the
    off-diagonal block by two triangular solves (``(d/2)³`` operations each). About ``d³/3``
    operations in all, the count of LAPACK's ``trtri``, instead of a solve's ``d³``.

    Args:
        lower: ``[n, d, d]`` lower triangular (the upper triangle is ignored), invertible.

    Returns:
        ``[n, d, d]`` lower triangular, the inverse; same dtype and device.
    """
    inverse = torch.zeros_like(lower)
    _lower_triangular_inverse_into(lower, inverse)
    return inverse


def _lower_triangular_inverse_into(lower: Tensor, out: Tensor) -> None:
    """Write ``lower⁻¹`` into ``out`` (zeros above the diagonal), the recursion of the above."""
    d = lower.shape[-1]
    if d <= TRIANGULAR_INVERSE_BASE:
        eye = torch.eye(d, dtype=lower.dtype, device=lower.device)
        out.copy_(torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False))
        return
    half = d // 2
    top, bottom = lower[:, :half, :half], lower[:, half:, half:]
    _lower_triangular_inverse_into(top, out[:, :half, :half])
    _lower_triangular_inverse_into(bottom, out[:, half:, half:])
    right = torch.linalg.solve_triangular(top, lower[:, half:, :half], upper=False, left=False)
    out[:, half:, :half] = torch.linalg.solve_triangular(bottom, right, upper=False).neg_()


def damped_inverse_root(psd: Tensor, damping: float) -> Tensor:
    """``R`` with ``R Rᵀ = (A + γI)⁻¹`` for symmetric positive semi-definite ``A``, batched.

    Computed in float64 by Cholesky, ``R = L⁻ᵀ`` with ``L Lᵀ = A + γI`` (upper triangular;
    ``L⁻¹`` by :func:`lower_triangular_inverse`).
    Where Cholesky fails (rounding left ``A`` with eigenvalues below ``−γ``), that matrix goes
    through its eigendecomposition ``A = V E Vᵀ`` instead, ``R = V (max(E, 0) + γ)^{-½}`` (no
    longer triangular; eigenvalues also floored at :data:`RELATIVE_EIGENVALUE_FLOOR` of the
    largest), and the fallback is counted by every active :class:`FallbackCounter`.

    Args:
        psd: ``[..., d, d]`` symmetric positive semi-definite up to rounding.
        damping: ``γ ≥ 0`` added to the diagonal.

    Returns:
        float64 ``[..., d, d]``.
    """
    chol, failed = _damped_cholesky(psd, damping)
    root = lower_triangular_inverse(chol).transpose(1, 2)
    del chol
    if bool(failed.any()):
        values, vectors = _floored_eigen(_failed_matrices(psd, failed), damping)
        root[failed] = vectors * values.rsqrt().unsqueeze(-2)
    result: Tensor = root.reshape(psd.shape)
    return result


def damped_inverse(psd: Tensor, damping: float) -> Tensor:
    """``(A + γI)⁻¹`` for symmetric positive semi-definite ``A``, batched.

    Computed in float64 by Cholesky then ``cholesky_inverse``; where Cholesky fails (rounding
    left ``A`` with eigenvalues below ``−γ``), through the eigendecomposition with the
    eigenvalues floored as in :func:`damped_inverse_root`, counted by every active
    :class:`FallbackCounter`. Arguments and result as :func:`damped_inverse_root`'s.
    """
    inverse, failed = _damped_cholesky(psd, damping)
    torch.cholesky_inverse(inverse, out=inverse)  # in place: one float64 matrix per input
    if bool(failed.any()):
        values, vectors = _floored_eigen(_failed_matrices(psd, failed), damping)
        inverse[failed] = (vectors / values.unsqueeze(-2)) @ vectors.transpose(1, 2)
    result: Tensor = inverse.reshape(psd.shape)
    return result


def spd_solve(matrices: Tensor, rhs: Tensor, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """``A⁻¹ B`` for symmetric positive definite ``A``, batched.

    By Cholesky in ``dtype`` (float64 unless the caller's accuracy allows less); a matrix for
    which it fails (singular, or indefinite from rounding) is solved in float64 through its
    eigendecomposition with eigenvalues floored at :data:`RELATIVE_EIGENVALUE_FLOOR` of the
    largest, and counted by every active :class:`FallbackCounter`.

    Args:
        matrices: ``[..., k, k]``.
        rhs: ``[..., k, r]``.
        dtype: The dtype of the factorisation and of the result.

    Returns:
        ``[..., k, r]`` in ``dtype``.
    """
    k, r = rhs.shape[-2:]
    A = matrices.to(dtype).reshape(-1, k, k)
    B = rhs.to(dtype).reshape(-1, k, r)
    chol, info = torch.linalg.cholesky_ex(A)
    failed = info != 0
    # Two triangular solves: the same values as torch.cholesky_solve, 2-8x faster on CPU for
    # batches of one or few right-hand sides (measured at k = 50 to 2000).
    lower = torch.linalg.solve_triangular(chol, B, upper=False)
    out: Tensor = torch.linalg.solve_triangular(chol.mT, lower, upper=True)
    if bool(failed.any()):
        eigenvalues, vectors = _eigen(A[failed].to(torch.float64))
        scaled = vectors / _floored(eigenvalues, 0.0).unsqueeze(-2)
        solved = scaled @ (vectors.transpose(1, 2) @ B[failed].to(torch.float64))
        out[failed] = solved.to(dtype)
        _record_fallbacks(int(failed.sum()))
    return out.reshape(rhs.shape)


def robust_cholesky(matrices: Tensor, *, upper: bool = False) -> Tensor:
    """Cholesky factors of symmetric positive definite matrices that never fail, in float64.

    A matrix for which Cholesky fails (singular, or indefinite from rounding) is first
    replaced by its nearest positive definite version: eigenvalues floored at
    :data:`RELATIVE_EIGENVALUE_FLOOR` of the largest. Each such repair is counted by every
    active :class:`FallbackCounter`.

    Args:
        matrices: ``[..., k, k]``.
        upper: Return upper factors ``U`` with ``A = Uᵀ U`` instead of lower ``L Lᵀ``.

    Returns:
        float64 ``[..., k, k]``.
    """
    k = matrices.shape[-1]
    A = matrices.to(torch.float64).reshape(-1, k, k)
    chol, info = torch.linalg.cholesky_ex(A, upper=upper)
    failed = info != 0
    if bool(failed.any()):
        eigenvalues, vectors = _eigen(A[failed])
        repaired = (vectors * _floored(eigenvalues, 0.0).unsqueeze(-2)) @ vectors.transpose(1, 2)
        repaired = 0.5 * (repaired + repaired.transpose(1, 2))
        chol[failed] = torch.linalg.cholesky(repaired, upper=upper)
        _record_fallbacks(int(failed.sum()))
    factors: Tensor = chol.reshape(matrices.shape)
    return factors


def native_bfloat16_products(device: torch.device) -> bool:
    """Whether matrix products in bfloat16 run natively, hence faster than float32, on ``device``.

    A CUDA device that supports bfloat16, or a CPU with AVX-512 BF16 or AMX instructions
    (elsewhere bfloat16 products are emulated, no faster than float32 or much slower). Reads
    torch's private CPU capability probes; False if they are missing.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        probes = torch.cpu._is_avx512_bf16_supported, torch.cpu._is_amx_tile_supported
        return any(bool(probe()) for probe in probes)
    except (AttributeError, RuntimeError):
        return False
