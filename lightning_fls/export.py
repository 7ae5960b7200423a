"""Exporting a pruned model: sparse storage of its pruned weights and what it saves."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SparseSizeReport:
    """Storage of the pruned weights, dense against compressed sparse rows (CSR).

    Attributes:
        parameters: Names of the parameters counted.
        weights: Number of weights in them.
        nonzeros: Number of non-zero weights.
        dense_mb: Their dense storage in MB.
        sparse_mb: Their CSR storage in MB (values, column indices, row pointers).
    """

    parameters: tuple[str, ...]
    weights: int
    nonzeros: int
    dense_mb: float
    sparse_mb: float

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return 1.0 - self.nonzeros / max(self.weights, 1)

    def __str__(self) -> str:
        return (
            f"{len(self.parameters)} pruned weight tensor(s): sparsity {self.sparsity:.4f}, "
            f"dense {self.dense_mb:.2f} MB, CSR {self.sparse_mb:.2f} MB"
        )


def _matrix(param: Tensor) -> Tensor:
    return param.detach().reshape(param.shape[0], -1) if param.dim() > 1 else param.detach()[None]


def sparse_size_report(model: nn.Module, names: Sequence[str]) -> SparseSizeReport:
    """Dense and CSR storage of the named parameters (each flattened to ``[d_out, rest]``).

    Args:
        model: The model.
        names: Fully-qualified parameter names, e.g. ``"encoder.0.weight"``.

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
        weights += matrix.numel()
        nonzeros += nnz
        dense += matrix.numel() * matrix.element_size()
        sparse += nnz * (matrix.element_size() + 8) + (matrix.shape[0] + 1) * 8
    return SparseSizeReport(tuple(names), weights, nonzeros, dense / 2**20, sparse / 2**20)


def export_pruned(
    model: nn.Module, path: str | Path, names: Sequence[str] | None = None
) -> SparseSizeReport:
    """Save the model's ``state_dict`` with the pruned weights stored as sparse CSR tensors.

    Load it back with :func:`load_pruned`. Parameters not named (or, by default, every
    parameter of dimension >= 2 that is at least half zeros) are stored dense.

    Args:
        model: The pruned model.
        path: File to write (``torch.save`` format).
        names: Parameters to store sparse.

    Returns:
        The storage report of the sparse parameters.
    """
    params = dict(model.named_parameters())
    if names is None:
        names = [
            n for n, p in params.items() if p.dim() >= 2 and float((p == 0).float().mean()) >= 0.5
        ]
    report = sparse_size_report(model, names)
    state: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in model.state_dict().items():
        if key in names:
            with warnings.catch_warnings():  # "CSR support is in beta": storage only here
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
                state[key] = _matrix(value).to_sparse_csr()
            shapes[key] = list(value.shape)
        else:
            state[key] = value.detach()
    torch.save({"state_dict": state, "sparse_shapes": shapes}, Path(path))
    return report


def load_pruned(path: str | Path) -> dict[str, Tensor]:
    """A dense ``state_dict`` from a file written by :func:`export_pruned`."""
    payload = torch.load(Path(path), weights_only=True)
    state: dict[str, Tensor] = {}
    for key, value in payload["state_dict"].items():
        if key in payload["sparse_shapes"]:
            state[key] = value.to_dense().reshape(payload["sparse_shapes"][key])
        else:
            state[key] = value
    return state
