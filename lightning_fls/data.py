"""``FashionMNISTDataModule``: full Fashion-MNIST from local IDX files, or a download on request."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fls._validation import check_choice, check_non_negative_int, check_positive_int
from lightning_fls.datasets import (
    FASHION_MNIST_FILES,
    download_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
)


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST (60 000 training and 10 000 test images, 28×28 grey, 10 classes).

    The IDX files are read from ``data_dir``, ``$LIGHTNING_FLS_DATA/fashion-mnist`` or
    ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``). Nothing
    is downloaded unless ``download=True``; then the files go to ``data_dir`` and their
    checksums are verified. The test split is also the validation split.

    Args:
        data_dir: Directory with the four IDX files (``*-ubyte.gz``); optional.
        task: ``"autoencoder"`` (targets are the images) or ``"classification"`` (labels).
        batch_size: Training batch size (>= 1); evaluation uses 1000.
        train_size: Use only the first ``train_size`` training images (None: all 60 000).
        download: Download the files into ``data_dir`` if they are not found.
        num_workers: DataLoader worker processes.
        seed: Seed of the training shuffle.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        task: Literal["autoencoder", "classification"] = "autoencoder",
        batch_size: int = 100,
        train_size: int | None = None,
        download: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.task = check_choice("task", task, ("autoencoder", "classification"))
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.train_size = (
            None if train_size is None else check_positive_int("train_size", train_size)
        )
        if download and data_dir is None:
            raise ValueError("`download=True` needs `data_dir`, the directory to download into.")
        if data_dir is not None and not download and not Path(data_dir).is_dir():
            raise FileNotFoundError(
                f"`data_dir` {data_dir!r} is not a directory (pass download=True to create it "
                "and download Fashion-MNIST there)."
            )
        self.data_dir = data_dir
        self.download = download
        self.num_workers = check_non_negative_int("num_workers", num_workers)
        self.seed = int(seed)
        self.train: TensorDataset | None = None
        self.test: TensorDataset | None = None

    def prepare_data(self) -> None:
        """Download the files if asked to and they are missing."""
        if self.download:
            try:
                find_fashion_mnist(self.data_dir)
            except FileNotFoundError:
                assert self.data_dir is not None
                download_fashion_mnist(self.data_dir)

    def setup(self, stage: str) -> None:
        """Load both splits into memory (``[N, 784]`` floats in ``[0, 1]``).

        Raises:
            FileNotFoundError: If ``data_dir`` was given and lacks some of the four files (no
                other location is tried then), or no location has them.
            ValueError: If a file is corrupt or ``train_size`` exceeds the training split.
        """
        if self.data_dir is not None:
            names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
            missing = [name for name in names if not (Path(self.data_dir) / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"`data_dir` {self.data_dir!r} lacks the Fashion-MNIST files {missing} "
                    "(pass download=True to download them there, or leave data_dir out to use "
                    "the Debian package dataset-fashion-mnist)."
                )
        if self.train is None:
            self.train = self._dataset("train", self.train_size)
            self.test = self._dataset("test", None)

    def _dataset(self, split: Literal["train", "test"], size: int | None) -> TensorDataset:
        images, labels = load_fashion_mnist(split, self.data_dir)
        if size is not None:
            if size > len(images):
                raise ValueError(
                    f"`train_size` is {size}, but the {split} split holds {len(images)} images."
                )
            images, labels = images[:size], labels[:size]
        return TensorDataset(images, images if self.task == "autoencoder" else labels)

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches ``(images, targets)``."""
        assert self.train is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        """Test-split batches of 1000."""
        assert self.test is not None, "call setup() first"
        return DataLoader(self.test, batch_size=1000, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader[Any]:
        """Test-split batches of 1000."""
        return self.val_dataloader()
