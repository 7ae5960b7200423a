from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_fls.datasets import (
    FASHION_MNIST_FILES,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from tests.helpers import write_idx


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("dtype", "code"), [(np.uint8, 0x08), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)]
)
def test_read_idx_round_trip(tmp_path: Path, dtype, code: int, compress: bool) -> None:
    array = (np.arange(24).reshape(2, 3, 4) * 7 % 251).astype(dtype)
    path = tmp_path / ("data.idx.gz" if compress else "data.idx")
    write_idx(path, array, code, compress)
    out = read_idx(path)
    assert tuple(out.shape) == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(array))


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="size"):
        read_idx(short)


def test_fashion_mnist_from_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTNING_FLS_DATA", raising=False)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([1, 9, 0], dtype=np.uint8)
    for split in FASHION_MNIST_FILES:
        image_file, label_file = FASHION_MNIST_FILES[split]
        write_idx(tmp_path / image_file, images, 0x08, compress=True)
        write_idx(tmp_path / label_file, labels, 0x08, compress=True)
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 784)
    assert x.dtype == torch.float32
    assert float(x.max()) <= 1.0
    torch.testing.assert_close(x[0, :28], torch.from_numpy(images[0, 0]).float() / 255)
    assert y.tolist() == [1, 9, 0]
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", root=tmp_path)  # type: ignore[arg-type]


def test_missing_data_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_FLS_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr("lightning_fls.datasets.DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "empty")
