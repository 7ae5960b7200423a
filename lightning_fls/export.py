"""Exporting a pruned model: sparse storage of its pruned weights and what it saves.

Two file formats, chosen by the suffix of the path given to :func:`export_pruned`:

- ``.safetensors``: a safetensors file of plain dense tensors, read without pickle (needs the
  ``safetensors`` package: ``pip install 'lightning_fls[hf]'``). A sparse weight ``name``
  becomes three tensors ``name.csr_values`` ``[nnz]``, ``name.csr_col_indices`` ``[nnz]`` and
  ``name.csr_row_pointers`` ``[rows + 1]`` (indices int32 where they fit, else int64); the
  original shapes, the tied-weight aliases, the order of the keys and the format version are
  JSON strings in the header's metadata.
- anything else: ``torch.save`` of the ``state_dict`` with the sparse weights as
  ``torch.sparse_csr`` tensors (int64 indices).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: Version of the safetensors layout written by :func:`export_pruned`.
SAFETENSORS_FORMAT_VERSION = 1

_SUFFIX = ".safetensors"
_META = "lightning_fls"  # prefix of the metadata keys
_CSR_PARTS = ("csr_values", "csr_col_indices", "csr_row_pointers")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SparseSizeReport:
    """Storage of the pruned weights, dense against compressed sparse rows (CSR).

    Attributes:
        parameters: Names of the parameters counted.
        weights: Number of weights in them.
        nonzeros: Number of non-zero weights.
        dense_mb: Their dense storage in MB.
        sparse_mb: Their CSR storage in MB: values, column indices ``[nnz]`` and row pointers
            ``[rows + 1]``, the indices at the width stored (8 bytes, or 4 where int32 is used).
        file_mb: Size on disk of the file written, in MB (the whole ``state_dict``: dense
            parameters and buffers too, and the file's header); None when nothing was written.
    """

    parameters: tuple[str, ...]
    weights: int
    nonzeros: int
    dense_mb: float
    sparse_mb: float
    file_mb: float | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return 1.0 - self.nonzeros / max(self.weights, 1)

    def __str__(self) -> str:
        text = (
            f"{len(self.parameters)} pruned weight tensor(s): sparsity {self.sparsity:.4f}, "
            f"dense {_size(self.dense_mb)}, CSR {_size(self.sparse_mb)}"
        )
        if self.file_mb is not None:
            text += f", file written {_size(self.file_mb)}"
        return text


def _size(mb: float) -> str:
    """``mb`` for reading: ``"12.34 MB"``, or in kB below 0.1 MB (``"13.9 kB"``)."""
    return f"{mb:.2f} MB" if mb >= 0.1 else f"{mb * 1024:.1f} kB"


def _matrix(param: Tensor) -> Tensor:
    """``param`` as the matrix its CSR form stores: ``[shape[0], rest]``, one row if 0-/1-D."""
    if param.dim() <= 1:
        return param.detach().reshape(1, -1)
    return param.detach().reshape(param.shape[0], math.prod(param.shape[1:]))


def _index_dtype(matrix: Tensor, nonzeros: int) -> torch.dtype:
    """int32 when the column indices and row pointers of ``matrix`` ``[rows, cols]`` fit."""
    return torch.int32 if max(matrix.shape[1], nonzeros) <= _INT32_MAX else torch.int64


def sparse_size_report(
    model: nn.Module, names: Sequence[str], *, int32_indices: bool = False
) -> SparseSizeReport:
    """Dense and CSR storage of the named parameters (each flattened to ``[d_out, rest]``).

    Args:
        model: The model.
        names: Fully-qualified parameter names, e.g. ``"encoder.0.weight"``.
        int32_indices: Count 4-byte indices for each tensor whose indices fit in int32, as the
            ``.safetensors`` format of :func:`export_pruned` stores them; otherwise 8 bytes (the
            ``torch.sparse_csr`` tensors of the ``torch.save`` format).

    Returns:
        The report, with ``file_mb`` None (nothing is written).

    Raises:
        KeyError: For a name the model does not have.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"The model has no parameter(s) {unknown}.")
    weights = nonzeros = dense = sparse = 0
    for name in names:
        matrix = _matrix(params[name])
        nnz = int((matrix != 0).sum())
        index_bytes = 8
        if int32_indices and _index_dtype(matrix, nnz) == torch.int32:
            index_bytes = 4
        weights += matrix.numel()
        nonzeros += nnz
        dense += matrix.numel() * matrix.element_size()
        sparse += nnz * (matrix.element_size() + index_bytes) + (matrix.shape[0] + 1) * index_bytes
    return SparseSizeReport(tuple(names), weights, nonzeros, dense / 2**20, sparse / 2**20)


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == _SUFFIX


def _safetensors_torch() -> Any:
    """The ``safetensors.torch`` module, imported on first use (an optional dependency)."""
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            ".safetensors files need the safetensors package: "
            "pip install 'lightning_fls[hf]' (or pip install safetensors)."
        ) from error
    return safetensors.torch


def export_pruned(
    model: nn.Module, path: str | Path, names: Sequence[str] | None = None
) -> SparseSizeReport:
    """Save the model's ``state_dict`` with the pruned weights stored sparse (CSR).

    The suffix of ``path`` picks the format (see the module's description): ``.safetensors``
    for a safetensors file of plain tensors, anything else for ``torch.save``. Each sparse
    weight of shape ``[d_out, ...]`` is stored as the CSR form of its ``[d_out, rest]`` matrix.
    Load it back with :func:`load_pruned`. Parameters not named (or, by default, every
    parameter of dimension >= 2 that is at least half zeros) and buffers are stored dense.

    In a ``.safetensors`` file, entries of the ``state_dict`` that are the same tensor (tied
    weights, such as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are stored
    once, the others recorded as aliases of it; :func:`load_pruned` restores every name.

    Args:
        model: The pruned model.
        path: File to write; its parent directory must exist.
        names: Parameters to store sparse.

    Returns:
        The storage report of the sparse parameters (indices counted at the width written),
        with ``file_mb`` the size of the file written.

    Raises:
        ValueError: If the parent directory of ``path`` does not exist, or ``path`` is a
            directory (nothing is written).
        KeyError: For a name the model does not have (nothing is written).
        ImportError: For a ``.safetensors`` path without the ``safetensors`` package.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"Cannot write path={str(path)!r}: its directory does not exist.")
    if path.is_dir():
        raise ValueError(f"Cannot write path={str(path)!r}: it is a directory.")
    safetensors = _is_safetensors(path)
    save_file = _safetensors_torch().save_file if safetensors else None  # ImportError first
    params = dict(model.named_parameters())
    if names is None:
        names = [
            n for n, p in params.items() if p.dim() >= 2 and float((p == 0).float().mean()) >= 0.5
        ]
    report = sparse_size_report(model, names, int32_indices=safetensors)
    if save_file is not None:
        tensors, metadata = _safetensors_payload(model.state_dict(), set(names))
        save_file(tensors, path, metadata=metadata)
    else:
        _torch_save(model.state_dict(), set(names), path)
    return dataclasses.replace(report, file_mb=path.stat().st_size / 2**20)


def _torch_save(state_dict: dict[str, Tensor], names: set[str], path: Path) -> None:
    state: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in state_dict.items():
        if key in names:
            with warnings.catch_warnings():  # "CSR support is in beta": storage only here
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
                csr = _matrix(value).to_sparse_csr()
                # Its column indices are a view of a [2, nnz] buffer, which torch.save would
                # write whole: a copy of them keeps the file at the size reported.
                state[key] = torch.sparse_csr_tensor(
                    csr.crow_indices(),
                    csr.col_indices().clone(),
                    csr.values(),
                    csr.shape,
                    check_invariants=False,  # they hold: to_sparse_csr made them
                )
            shapes[key] = list(value.shape)
        else:
            state[key] = value.detach()
    torch.save({"state_dict": state, "sparse_shapes": shapes}, path)


def _csr(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Values ``[nnz]``, column indices ``[nnz]``, row pointers ``[rows + 1]`` of ``matrix``."""
    nonzero = matrix != 0
    rows, cols = nonzero.nonzero(as_tuple=True)  # row-major order
    dtype = _index_dtype(matrix, rows.numel())
    counts = nonzero.sum(dim=1)
    pointers = torch.cat([counts.new_zeros(1), counts.cumsum(dim=0)])
    return matrix[rows, cols].contiguous(), cols.to(dtype), pointers.to(dtype)


def _dense(values: Tensor, cols: Tensor, pointers: Tensor, shape: list[int]) -> Tensor:
    """The tensor of ``shape`` whose ``[shape[0], rest]`` matrix has this CSR form."""
    rows = len(pointers) - 1
    matrix = torch.zeros(rows, math.prod(shape) // max(rows, 1), dtype=values.dtype)
    row_of = torch.repeat_interleave(torch.arange(rows), pointers.long().diff())
    matrix[row_of, cols.long()] = values
    return matrix.reshape(shape)


def _storage_key(value: Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors the same view of the same memory (None: one holding no memory)."""
    if value.numel() == 0 or value.device.type == "meta":
        return None
    storage = value.untyped_storage().data_ptr()
    return (value.device, storage, value.storage_offset(), value.shape, value.stride(), value.dtype)


def _safetensors_payload(
    state_dict: dict[str, Tensor], names: set[str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header metadata of the ``.safetensors`` format of ``state_dict``."""
    stored: dict[tuple[Any, ...], str] = {}  # the key stored for each view: sparse, else first
    for key, value in state_dict.items():
        view = _storage_key(value)
        if view is not None and (
            view not in stored or (key in names and stored[view] not in names)
        ):
            stored[view] = key
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    aliases: dict[str, str] = {}
    memory: set[tuple[Any, ...]] = set()  # (device, storage) of the dense tensors kept
    for key, value in state_dict.items():
        view = _storage_key(value)
        if view is not None and stored[view] != key:
            aliases[key] = stored[view]
        elif key in names:
            csr = _csr(_matrix(value))
            for part, tensor in zip(_CSR_PARTS, csr, strict=True):
                tensors[f"{key}.{part}"] = tensor.cpu()
            shapes[key] = list(value.shape)
        else:
            tensor = value.detach()
            if view is not None:  # another view of memory kept already gets its own copy
                tensor = tensor.clone() if view[:2] in memory else tensor
                memory.add(view[:2])
            tensors[key] = tensor.cpu().contiguous()
    clashes = sorted(
        f"{key}.{part}" for key in shapes for part in _CSR_PARTS if f"{key}.{part}" in state_dict
    )
    if clashes:
        raise ValueError(f"The state_dict already has {clashes}, names of the CSR parts.")
    metadata = {
        "format": "pt",
        f"{_META}.format_version": str(SAFETENSORS_FORMAT_VERSION),
        f"{_META}.keys": json.dumps(list(state_dict)),
        f"{_META}.sparse_shapes": json.dumps(shapes),
        f"{_META}.aliases": json.dumps(aliases),
    }
    return tensors, metadata


def load_pruned(path: str | Path) -> dict[str, Tensor]:
    """A dense ``state_dict`` from a file written by :func:`export_pruned`.

    Args:
        path: The file; a ``.safetensors`` suffix reads the safetensors format, anything else
            the ``torch.save`` one.

    Returns:
        The model's ``state_dict``: every tensor dense, in its original shape and dtype (on the
        CPU for a ``.safetensors`` file), tied weights restored under each of their names.

    Raises:
        ValueError: For a ``.safetensors`` file not written by :func:`export_pruned`, or by a
            newer format version.
        ImportError: For a ``.safetensors`` path without the ``safetensors`` package.
    """
    path = Path(path)
    if _is_safetensors(path):
        return _load_safetensors(path)
    payload = torch.load(path, weights_only=True)
    state: dict[str, Tensor] = {}
    for key, value in payload["state_dict"].items():
        if key in payload["sparse_shapes"]:
            state[key] = value.to_dense().reshape(payload["sparse_shapes"][key])
        else:
            state[key] = value
    return state


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    with _safetensors_torch().safe_open(path, framework="pt") as file:
        metadata: dict[str, str] = file.metadata() or {}
        stored: list[str] = file.keys()
        tensors: dict[str, Tensor] = {key: file.get_tensor(key) for key in stored}
    version = metadata.get(f"{_META}.format_version")
    if version is None:
        raise ValueError(
            f"{str(path)!r} was not written by export_pruned (no {_META}.* metadata); "
            "read it with safetensors.torch.load_file."
        )
    if int(version) > SAFETENSORS_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {version}; this lightning_fls reads up to "
            f"{SAFETENSORS_FORMAT_VERSION}."
        )
    shapes: dict[str, list[int]] = json.loads(metadata[f"{_META}.sparse_shapes"])
    aliases: dict[str, str] = json.loads(metadata[f"{_META}.aliases"])
    for key, shape in shapes.items():
        values, cols, pointers = (tensors.pop(f"{key}.{part}") for part in _CSR_PARTS)
        tensors[key] = _dense(values, cols, pointers, shape)
    # Tied names get the very tensor of the name stored, as the model's state_dict has them.
    return {key: tensors[aliases.get(key, key)] for key in json.loads(metadata[f"{_META}.keys"])}
