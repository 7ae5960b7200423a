"""Run a 2:4-pruned model on PyTorch's semi-structured sparse kernels (NVIDIA GPUs, inference).

A model pruned with ``pattern="2:4"`` keeps its pruned weights as dense zeros: it is no faster
than the dense model. On an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper),
:func:`to_semi_structured` swaps each selected ``nn.Linear`` weight ``[d_out, d_in]`` for a
``torch.sparse.SparseSemiStructuredTensor`` (the kept half of the values plus 2-bit indices),
whose products run on the sparse tensor cores: the recipe of PyTorch's tutorial "Accelerating
BERT with semi-structured sparsity". :func:`semi_structured_support` says whether this machine
can do it and, if not, why.

torch's 2:4 rule is the one of :mod:`lightning_fls.patterns` for ``"2:4"``: at most 2 non-zeros
in every 4 consecutive weights along each row (the input dimension) of the weight.

This module imports only torch and the standard library, so that
``benchmarks/semi_structured_speed.py`` can load it by file path on a GPU machine that lacks the
package's other dependencies (Lightning).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
"""Weight dtypes :func:`to_semi_structured` converts (those torch's 2:4 matrix products take)."""

MIN_COMPUTE_CAPABILITY = (8, 0)
"""Oldest NVIDIA compute capability with sparse tensor cores (Ampere)."""

NO_CUDA_MESSAGE = (
    "2:4 sparse kernels need an NVIDIA GPU of compute capability 8.0 or newer (Ampere, Hopper); "
    "this machine has no CUDA device: the 2:4 masks still hold as dense zeros, with no speed-up"
)
"""The reason :func:`semi_structured_support` gives on a machine without CUDA."""

# Used only when torch does not expose its own table (the ``_DTYPE_SHAPE_CONSTRAINTS`` of the
# SparseSemiStructuredTensor subclasses, torch 2.2 to 2.13 at least): the smallest sparse
# weight (rows, columns), both dimensions a multiple of it, per backend and dtype.
_FALLBACK_SHAPE_CONSTRAINTS: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128)},
}

_LISTED = 20  # names shown in an error message before "... and N more"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} ... and {len(items) - _LISTED} more"


def _force_cutlass() -> bool:
    tensor_class = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return bool(getattr(tensor_class, "_FORCE_CUTLASS", False))


def _shape_constraints() -> tuple[str, dict[torch.dtype, tuple[int, int]]]:
    """The backend ``to_sparse_semi_structured`` uses and its minimum weight shape per dtype.

    Returns:
        ``("cusparselt" | "cutlass", {dtype: (min_rows, min_columns)})``; a weight
        ``[rows, columns]`` is accepted if ``rows`` is a positive multiple of ``min_rows`` and
        ``columns`` of ``min_columns``. Read from torch when it exposes the table.
    """
    backend = "cutlass" if _force_cutlass() else "cusparselt"
    class_name = f"SparseSemiStructuredTensor{backend.upper()}"
    try:
        table: Any = getattr(torch.sparse, class_name)._DTYPE_SHAPE_CONSTRAINTS
        constraints = {
            dtype: (int(config.sparse_min_rows), int(config.sparse_min_cols))
            for dtype, config in table.items()
        }
    except (AttributeError, TypeError, ValueError):
        constraints = dict(_FALLBACK_SHAPE_CONSTRAINTS[backend])
    return backend, constraints


def semi_structured_support(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether ``torch.sparse.to_sparse_semi_structured`` can run here, and if not, why.

    Args:
        device: The device the weights would be on; ``None``: the current CUDA device.

    Returns:
        ``(True, "")``, or ``(False, reason)`` with the reason in plain words: torch lacking
        ``torch.sparse.to_sparse_semi_structured``; no CUDA device (:data:`NO_CUDA_MESSAGE`);
        ``device`` not a CUDA device, or one this machine does not have; a GPU of compute
        capability below 8.0 (named, with its capability); or a torch build without cuSPARSELt,
        the default backend.
    """
    if getattr(torch.sparse, "to_sparse_semi_structured", None) is None:
        return False, (
            f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured (added in "
            f"torch 2.1): upgrade torch to use the 2:4 sparse kernels"
        )
    if not torch.cuda.is_available():
        return False, NO_CUDA_MESSAGE
    target = torch.device("cuda") if device is None else torch.device(device)
    if target.type != "cuda":
        return False, (
            f"2:4 sparse kernels run on CUDA tensors only, and these are on {target}: move the "
            f"model to the GPU first (`model.cuda()`)"
        )
    index = torch.cuda.current_device() if target.index is None else target.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        return False, f"there is no CUDA device {index}: this machine has {count}"
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        return False, (
            f"2:4 sparse kernels need an NVIDIA GPU of compute capability 8.0 or newer (Ampere, "
            f"Hopper); cuda:{index} is a {name} of compute capability {major}.{minor}: the 2:4 "
            f"masks still hold as dense zeros, with no speed-up"
        )
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if not _force_cutlass() and cusparselt is not None and not cusparselt.is_available():
        return False, (
            f"this torch build ({torch.__version__}) has no cuSPARSELt, the backend "
            f"torch.sparse.to_sparse_semi_structured uses by default; set "
            f"`torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True` to use its CUTLASS "
            f"kernels instead"
        )
    return True, ""


def _is_converted(weight: Tensor) -> bool:
    tensor_class = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return tensor_class is not None and isinstance(weight, tensor_class)


def _convertible_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(weight name, layer)`` of every ``nn.Linear`` whose weight can still be converted."""
    fused = {
        id(module.out_proj)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in fused:
            continue
        weight = module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter) or _is_converted(weight):
            continue
        found.append((f"{name}.weight" if name else "weight", module))
    return found


def _two_four_violations(weight: Tensor) -> int:
    """Groups of 4 consecutive weights along a row with more than 2 non-zeros.

    Args:
        weight: ``[rows, columns]``, ``columns`` a multiple of 4.

    Returns:
        The number of such groups (of ``rows · columns / 4``).
    """
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return int((nonzero > 2).sum())


def to_semi_structured(model: nn.Module, *, include: Sequence[str] | None = None) -> list[str]:
    """Swap, in place, the weights of a 2:4-pruned model's Linear layers for 2:4 sparse tensors.

    Each selected ``nn.Linear`` weight ``[d_out, d_in]`` becomes
    ``nn.Parameter(torch.sparse.to_sparse_semi_structured(weight), requires_grad=False)``; the
    layer's ``forward`` (``F.linear`` on inputs ``[..., d_in]`` of the weight's dtype and device)
    then runs on the sparse tensor cores, with the same results up to rounding. For inference:
    the converted weights are frozen. Every check runs before anything is modified, and the
    conversions are all made before any is assigned, so a failure leaves the model as it was.

    Not converted: ``nn.MultiheadAttention`` (its packed ``in_proj_weight`` ``[3d, d]`` is a
    Parameter, not a Linear layer, and its forward uses it, and its ``out_proj`` Linear too,
    through fused functions that take no sparse weight; use separate Linear projections, such as
    :class:`lightning_fls.models.SelfAttention`, to sparsify attention); convolutions; weights
    already converted; lazy layers not yet initialised.

    Args:
        model: The model, on a CUDA device of compute capability 8.0+ and in float16, bfloat16
            or int8 (e.g. ``model.cuda().half()``), every selected weight following 2:4.
        include: Glob patterns (``fnmatch``, case-sensitive; ``*`` matches dots too) of weight
            names such as ``"blocks.0.mlp.fc1.weight"``; default: every Linear weight. Each
            pattern must match some Linear weight.

    Returns:
        The names of the converted weights, in module order.

    Raises:
        TypeError: If ``include`` is not a list of strings.
        ValueError: If the model has no convertible Linear layer, an ``include`` pattern
            matches none, or a selected weight has a dtype or shape torch's 2:4 kernels refuse,
            or does not follow 2:4 (every such weight is named).
        RuntimeError: If this machine or the weights' device cannot run the 2:4 kernels (the
            reason from :func:`semi_structured_support`), or torch refuses a conversion.
    """
    if include is not None and (
        isinstance(include, str) or not all(isinstance(p, str) for p in include)
    ):
        raise TypeError(
            f"`include` must be a list of glob patterns (strings) or None, got {include!r}."
        )
    candidates = _convertible_linears(model)
    if not candidates:
        raise ValueError(
            "`model` has no nn.Linear layer to convert to 2:4 sparse tensors "
            "(nn.MultiheadAttention is not converted, nor are weights already converted)."
        )
    names = [name for name, _ in candidates]
    selected = candidates
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(
                    f"`include` pattern {pattern!r} matches no nn.Linear weight; the convertible "
                    f"weights are: {_listing(names)}."
                )
        selected = [
            (name, layer)
            for name, layer in candidates
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
        ]

    for device in dict.fromkeys(layer.weight.device for _, layer in selected):
        supported, reason = semi_structured_support(device)
        if not supported:
            raise RuntimeError(f"Cannot convert to 2:4 semi-structured sparse tensors: {reason}.")

    backend, constraints = _shape_constraints()
    dtypes = [dtype for dtype in SEMI_STRUCTURED_DTYPES if dtype in constraints]
    wrong_dtype = [
        f"`{name}` ({layer.weight.dtype})"
        for name, layer in selected
        if layer.weight.dtype not in dtypes
    ]
    if wrong_dtype:
        raise ValueError(
            f"2:4 sparse kernels take {', '.join(map(str, dtypes))} weights; not "
            f"{_listing(wrong_dtype)}. Call `model.half()` or `model.to(torch.bfloat16)` first "
            f"(and feed inputs of the same dtype)."
        )

    wrong_shape = []
    for name, layer in selected:
        rows, columns = layer.weight.shape
        min_rows, min_columns = constraints[layer.weight.dtype]
        if rows < min_rows or rows % min_rows or columns < min_columns or columns % min_columns:
            wrong_shape.append(
                f"`{name}` of shape ({rows}, {columns}) needs rows a positive multiple of "
                f"{min_rows} and columns of {min_columns} ({layer.weight.dtype}, {backend})"
            )
    if wrong_shape:
        raise ValueError(
            f"torch's 2:4 sparse kernels refuse these Linear weights [d_out, d_in]: "
            f"{_listing(wrong_shape)}. Leave them out with `include` (e.g. include=['blocks.*'])."
        )

    broken = []
    for name, layer in selected:
        count = _two_four_violations(layer.weight)
        if count:
            broken.append(f"`{name}` ({count} of {layer.weight.numel() // 4} groups)")
    if broken:
        raise ValueError(
            f"These weights do not follow 2:4 (at most 2 non-zeros in every 4 consecutive "
            f'weights along each row): {_listing(broken)}. Prune them with pattern="2:4" '
            f"first, or leave them out with `include`."
        )

    sparse: dict[int, nn.Parameter] = {}  # by id: a weight shared by layers is converted once
    for name, layer in selected:
        weight = layer.weight
        if id(weight) in sparse:
            continue
        try:
            packed = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
        except (RuntimeError, ValueError, NotImplementedError) as error:
            raise RuntimeError(
                f"torch refused to convert `{name}` (shape {tuple(weight.shape)}, {weight.dtype}, "
                f"{weight.device}) to a 2:4 sparse tensor: {error} Nothing was modified."
            ) from error
        sparse[id(weight)] = nn.Parameter(packed, requires_grad=False)
    for _, layer in selected:
        layer.weight = sparse[id(layer.weight)]
    return [name for name, _ in selected]
