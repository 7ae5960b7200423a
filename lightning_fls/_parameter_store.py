"""Copies of layers' parameters kept in a temporary file: undo data that is rarely read back."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import IO

import torch
from torch import Tensor


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes lie in the file, and how to rebuild it."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device


class ParameterStore(MutableMapping[str, dict[str, Tensor]]):
    """Parameter values by layer key, written to an unnamed temporary file instead of memory.

    Undo data (:func:`~lightning_fls.prune_one_shot` puts the model back if it fails part-way;
    the safeguard of :mod:`lightning_fls.safeguard` puts back a layer whose correction hurt) is
    written once and read back only when something goes wrong. Held in memory it would add 4
    bytes per float32 weight of the model to the peak: 340 MB on a BERT-base encoder (85 M
    pruned weights), three quarters of its largest layer's block-diagonal Q. Here an assignment
    ``store[key] = {name: tensor}`` writes the tensors' bytes (80 ms for 324 MB here, to
    the page cache), and ``store[key]`` reads a fresh copy back onto each tensor's device. The
    file (:func:`tempfile.TemporaryFile`, in ``TMPDIR``) has no name and is gone once
    :meth:`close` runs or the process ends. If it cannot be written (no space, no writable
    temporary directory), the values are kept in memory from then on, with a warning.
    """

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._end = 0
        self._on_disk: dict[str, dict[str, _Stored]] = {}
        self._in_memory: dict[str, dict[str, Tensor]] = {}
        self._disk_failed = False

    @property
    def on_disk(self) -> bool:
        """Whether every value is in the file (False once one had to stay in memory)."""
        return not self._in_memory

    def __setitem__(self, key: str, values: Mapping[str, Tensor]) -> None:
        self._on_disk.pop(key, None)
        self._in_memory.pop(key, None)
        if not self._disk_failed:
            try:
                self._on_disk[key] = {name: self._write(v) for name, v in values.items()}
                return
            except OSError as error:
                self._on_disk.pop(key, None)
                self._disk_failed = True
                warnings.warn(
                    f"Could not write undo copies of the pruned layers to a temporary file "
                    f"({error}); keeping them in memory instead (4 bytes per float32 weight). "
                    "Point TMPDIR to a directory with space to avoid that.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._in_memory[key] = {name: v.detach().clone() for name, v in values.items()}

    def _write(self, value: Tensor) -> _Stored:
        if self._file is None:
            # Kept open past this call on purpose: closed by close() or __exit__.
            self._file = tempfile.TemporaryFile(prefix="lightning_fls-")  # noqa: SIM115
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy()
        self._file.seek(self._end)
        self._file.write(raw.data)
        stored = _Stored(self._end, raw.nbytes, value.dtype, tuple(value.shape), value.device)
        self._end += raw.nbytes
        return stored

    def __getitem__(self, key: str) -> dict[str, Tensor]:
        if key in self._in_memory:
            return {name: v.clone() for name, v in self._in_memory[key].items()}
        return {name: self._read(stored) for name, stored in self._on_disk[key].items()}

    def _read(self, stored: _Stored) -> Tensor:
        assert self._file is not None
        self._file.seek(stored.offset)
        data = bytearray(self._file.read(stored.nbytes))
        if len(data) != stored.nbytes:
            raise OSError("The temporary file of undo copies was cut short.")
        empty = torch.empty(0, dtype=torch.uint8)
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else empty
        value = raw.view(stored.dtype).reshape(stored.shape)
        return value.to(stored.device)

    def __delitem__(self, key: str) -> None:
        if key in self._in_memory:
            del self._in_memory[key]
        else:
            del self._on_disk[key]  # its bytes stay in the file until close()

    def __iter__(self) -> Iterator[str]:
        yield from self._on_disk
        yield from self._in_memory

    def __len__(self) -> int:
        return len(self._on_disk) + len(self._in_memory)

    def __contains__(self, key: object) -> bool:
        return key in self._on_disk or key in self._in_memory

    def close(self) -> None:
        """Delete the file and forget every value."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._on_disk.clear()
        self._in_memory.clear()
        self._end = 0

    def __enter__(self) -> ParameterStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
