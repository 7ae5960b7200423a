"""Bad input not covered elsewhere: frozen and tied weights, pattern types, the CLI, the data.

Each case checks that the error names the problem and that nothing was changed (the model's
parameters, the files on disk). The full catalogue, with where each case is tested, is in
docs/bad-input.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lightning_fls import FLSPruningCallback, prune_one_shot
from lightning_fls.cli import main
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.datasets import FASHION_MNIST_FILES
from tests.callback_models import TinyClassifier
from tests.helpers import classifier_and_loader, fake_fashion_mnist, write_idx


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


class Tied(TinyClassifier):
    """A second Linear that shares the first one's weight tensor."""

    def __init__(self) -> None:
        super().__init__(features=12, hidden=12)
        self.head = nn.Linear(12, 12)
        self.head.weight = self.net[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.head(x))


def frozen_first_layer() -> TinyClassifier:
    model = TinyClassifier()
    model.net[0].weight.requires_grad_(False)
    return model


def all_frozen() -> TinyClassifier:
    model = TinyClassifier()
    model.net[0].weight.requires_grad_(False)
    model.net[2].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    ("make_model", "kwargs", "message"),
    [
        (frozen_first_layer, {"include": ["net.*"]}, r"frozen.*\['net.0.weight'\]"),
        (all_frozen, {}, r"Every prunable weight of TinyClassifier is frozen"),
        (Tied, {}, r"`net.0.weight` and `head.weight` are one tensor \(tied weights\)"),
    ],
    ids=["include-frozen", "all-frozen", "tied-weights"],
)
def test_callback_refuses_frozen_and_tied_weights_at_setup(
    tmp_path: Path, make_model: Any, kwargs: dict[str, Any], message: str
) -> None:
    model = make_model()
    before = snapshot(model)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[FLSPruningCallback(verbose=False, end_epoch=1, **kwargs)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(model)
    assert_unchanged(model, before)


def test_frozen_weights_are_left_out_by_default(tmp_path: Path) -> None:
    model = frozen_first_layer()
    frozen = model.net[0].weight.detach().clone()
    pruning = FLSPruningCallback(target_sparsity=0.5, end_epoch=1, aux_every_n_steps=1)
    pl.Trainer(
        max_epochs=2,
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    ).fit(model)
    assert list(pruning.masks) == ["net.2.weight"]
    assert torch.equal(model.net[0].weight, frozen)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "net.*"}, r"`include` must be a list of glob patterns.*\['net.\*'\]"),
        ({"exclude": [0, 2]}, r"`exclude` must be a list of glob patterns \(strings\)"),
    ],
)
def test_patterns_must_be_lists_of_strings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        FLSPruningCallback(**kwargs)
    model, loader = classifier_and_loader()
    before = snapshot(model)
    with pytest.raises(TypeError, match=message):
        prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, progress=False, **kwargs)
    assert_unchanged(model, before)


def test_prune_one_shot_refuses_tied_weights() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    x, y = torch.randn(32, 6), torch.randint(0, 6, (32,))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`0.weight` and `2.weight` are one tensor"):
        prune_one_shot(model, [(x, y)], F.cross_entropy, sparsity=0.5, progress=False)
    assert_unchanged(model, before)


# -- the command line ------------------------------------------------------------------------


def write_config(directory: Path, callback_args: dict[str, Any], **sections: Any) -> Path:
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": False,
            "default_root_dir": str(directory / "runs"),
            "callbacks": [
                {"class_path": "lightning_fls.FLSPruningCallback", "init_args": callback_args}
            ],
        },
        "model": {"class_path": "lightning_fls.models.MLPClassifier"},
        "data": {
            "class_path": "lightning_fls.data.FashionMNISTDataModule",
            "init_args": {"task": "classification", "data_dir": str(directory / "fmnist")},
        },
    }
    config.update(sections)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("callback_args", "sections", "messages"),
    [
        ({"target_sparsity": 1.5}, {}, ["`target_sparsity` must be in [0, 1), got 1.5"]),
        ({"target_sparsity": "high"}, {}, ['"target_sparsity"', "Expected a <class 'float'>"]),
        ({"sparsity": 0.9}, {}, ["'sparsity' is not accepted"]),
        ({"method": "sparse"}, {}, ["method", "'fls'"]),
        (
            {},
            {"model": {"class_path": "my_models.Missing"}},
            ["my_models.Missing"],
        ),
        (
            {},
            {
                "data": {
                    "class_path": "lightning_fls.data.FashionMNISTDataModule",
                    "init_args": {"data_dir": "/nonexistent/fmnist"},
                }
            },
            ["`data_dir` '/nonexistent/fmnist' is not a directory"],
        ),
    ],
    ids=["out-of-range", "wrong-type", "unknown-key", "unknown-method", "unknown-model", "no-dir"],
)
def test_cli_reports_bad_configurations_without_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    callback_args: dict[str, Any],
    sections: dict[str, Any],
    messages: list[str],
) -> None:
    fake_fashion_mnist(tmp_path / "fmnist", train=20, test=10)
    config = write_config(tmp_path, callback_args, **sections)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was written


# -- the data --------------------------------------------------------------------------------


def rewrite(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_file, label_file = FASHION_MNIST_FILES[split]
    write_idx(directory / image_file, images, 0x08, compress=True)
    write_idx(directory / label_file, labels, 0x08, compress=True)


@pytest.mark.parametrize(
    ("corrupt", "error", "message"),
    [
        (
            lambda d: rewrite(d, "train", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)),
            ValueError,
            "holds no images",
        ),
        (
            lambda d: rewrite(d, "train", np.zeros((5, 20, 20), np.uint8), np.zeros(5, np.uint8)),
            ValueError,
            r"shape \(20, 20\), expected 28×28",
        ),
        (
            lambda d: rewrite(d, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8)),
            ValueError,
            r"holds \(4,\) labels for 5 images",
        ),
        (
            lambda d: (d / FASHION_MNIST_FILES["test"][1]).unlink(),
            FileNotFoundError,
            r"lacks the Fashion-MNIST files \['t10k-labels-idx1-ubyte.gz'\]",
        ),
        (
            lambda d: (d / FASHION_MNIST_FILES["train"][0]).write_bytes(b"\x1f\x8b garbage"),
            ValueError,
            "train-images-idx3-ubyte.gz is corrupt",
        ),
    ],
    ids=["empty", "wrong-shape", "label-count", "missing-file", "corrupt-gzip"],
)
def test_bad_data_files_are_named(
    tmp_path: Path, corrupt: Any, error: type[Exception], message: str
) -> None:
    directory = fake_fashion_mnist(tmp_path / "fmnist", train=20, test=10)
    corrupt(directory)
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    data = FashionMNISTDataModule(str(directory), task="classification")
    with pytest.raises(error, match=message):
        data.setup("fit")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == files  # left as it was


def test_data_module_argument_errors(tmp_path: Path) -> None:
    directory = fake_fashion_mnist(tmp_path / "fmnist", train=20, test=10)
    with pytest.raises(ValueError, match="`num_workers` must be an integer >= 0, got -1"):
        FashionMNISTDataModule(str(directory), num_workers=-1)
    data = FashionMNISTDataModule(str(directory), train_size=50)
    with pytest.raises(ValueError, match="`train_size` is 50, but the train split holds 20"):
        data.setup("fit")
    assert data.train is None


def test_a_model_state_is_not_touched_by_a_bad_one_shot_copy() -> None:
    # Sanity of the helpers: a deep copy compares equal, a pruned one does not.
    model, loader = classifier_and_loader()
    before = snapshot(model)
    assert_unchanged(copy.deepcopy(model), before)
    prune_one_shot(model, loader, F.cross_entropy, sparsity=0.5, steps=1, progress=False)
    with pytest.raises(AssertionError):
        assert_unchanged(model, before)
