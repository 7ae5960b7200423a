"""Reading Fashion-MNIST from local IDX files (no download at run time).

Full Fashion-MNIST (60k/10k, MIT licence) is found, in this order, in the directory given, in
``$LIGHTNING_FLS_DATA/fashion-mnist``, and in ``/usr/share/datasets/fashion-mnist`` where the
Debian package ``dataset-fashion-mnist`` installs it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the four IDX files."""

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The Fashion-MNIST authors' mirror, used only by :func:`download_fashion_mnist`."""

FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
"""SHA-256 of each file's **decompressed** IDX content (gzip re-compression does not change it)."""

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (optionally gzip-compressed) into a tensor.

    IDX layout: two zero bytes, a dtype code, the number of dimensions ``k``, then ``k``
    big-endian uint32 sizes and the big-endian data.

    Args:
        path: The file.

    Returns:
        A tensor with the file's shape (uint8 data stays uint8).

    Raises:
        ValueError: If the file is not valid IDX or its compression is corrupt.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path} is corrupt: {error}.") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count} items of shape {shape}, file size disagrees.")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files.

    Args:
        root: A directory to look in first.

    Returns:
        The first directory (``root``, ``$LIGHTNING_FLS_DATA/fashion-mnist``, the Debian path)
        that has all four files.

    Raises:
        FileNotFoundError: If none has them; the message says how to get them.
    """
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root))
    if os.environ.get("LIGHTNING_FLS_DATA"):
        candidates.append(Path(os.environ["LIGHTNING_FLS_DATA"]) / "fashion-mnist")
    candidates.append(DEBIAN_FASHION_MNIST)
    names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
    for directory in candidates:
        if all((directory / name).is_file() for name in names):
            return directory
    searched = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files ({', '.join(names)}) not found in: {searched}. "
        "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
        "the four files from https://github.com/zalandoresearch/fashion-mnist in a directory "
        "and pass it as `root` (or set LIGHTNING_FLS_DATA)."
    )


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images and labels.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000).
        root: Optional directory to look in first (see :func:`find_fashion_mnist`).

    Returns:
        ``images`` as float32 in ``[0, 1]`` of shape ``[N, 784]`` and ``labels`` as int64 ``[N]``.

    Raises:
        ValueError: If ``split`` is unknown, or the files hold no images, images that are not
            28×28, or a different number of labels.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"`split` must be one of {tuple(FASHION_MNIST_FILES)}, got {split!r}.")
    directory = find_fashion_mnist(root)
    image_file, label_file = FASHION_MNIST_FILES[split]
    raw = read_idx(directory / image_file)
    labels = read_idx(directory / label_file).long()
    if raw.dim() != 3 or tuple(raw.shape[1:]) != (28, 28):
        raise ValueError(
            f"{directory / image_file} holds items of shape {tuple(raw.shape[1:])}, expected "
            "28×28 images."
        )
    if raw.shape[0] == 0:
        raise ValueError(f"{directory / image_file} holds no images.")
    if labels.shape != (raw.shape[0],):
        raise ValueError(
            f"{directory / label_file} holds {tuple(labels.shape)} labels for {raw.shape[0]} "
            f"images in {image_file}."
        )
    return raw.reshape(-1, 784).float() / 255.0, labels


def verify_fashion_mnist(directory: str | Path) -> None:
    """Check the four files' decompressed content against :data:`FASHION_MNIST_SHA256`.

    Raises:
        ValueError: Naming the first file whose checksum differs.
    """
    for name, expected in FASHION_MNIST_SHA256.items():
        with gzip.open(Path(directory) / name, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest != expected:
            raise ValueError(
                f"{Path(directory) / name} is corrupt or not Fashion-MNIST: SHA-256 of its content "
                f"is {digest}, expected {expected}."
            )


def download_fashion_mnist(root: str | Path, url: str = FASHION_MNIST_URL) -> Path:
    """Download the four Fashion-MNIST files into ``root`` and verify their checksums.

    Files already there with the right checksum are kept. Only call this when the user asked
    for a download (the data modules do so for ``download=True``).

    Args:
        root: Directory to write to (created if needed).
        url: Base URL of the mirror.

    Returns:
        ``root`` as a Path.

    Raises:
        RuntimeError: If the network is unreachable; the message says how else to get the data.
        ValueError: If a downloaded file fails its checksum (it is deleted).
    """
    directory = Path(root)
    directory.mkdir(parents=True, exist_ok=True)
    for name, expected in FASHION_MNIST_SHA256.items():
        target = directory / name
        if target.is_file() and _content_sha256(target) == expected:
            continue
        partial = target.with_suffix(".part")
        try:
            urllib.request.urlretrieve(url + name, partial)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise RuntimeError(
                f"Could not download {url + name} ({error}). Install the data with "
                "`sudo apt-get install dataset-fashion-mnist`, or copy the four IDX files into "
                f"{directory}."
            ) from error
        digest = _content_sha256(partial)
        if digest != expected:
            partial.unlink()
            raise ValueError(f"Downloaded {name} has SHA-256 {digest}, expected {expected}.")
        partial.replace(target)
    return directory


def _content_sha256(path: Path) -> str:
    try:
        with gzip.open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except (OSError, EOFError):
        return ""
