from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_fls.cli import main
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.datasets import (
    DEBIAN_FASHION_MNIST,
    download_fashion_mnist,
)
from tests.callback_models import TinyClassifier
from tests.helpers import fake_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def test_data_module_tasks_and_sizes(tmp_path: Path) -> None:
    data_dir = fake_fashion_mnist(tmp_path / "fmnist")
    auto = FashionMNISTDataModule(str(data_dir), task="autoencoder", batch_size=50, train_size=120)
    auto.setup("fit")
    x, y = next(iter(auto.train_dataloader()))
    assert x.shape == (50, 784)
    assert torch.equal(x, y)
    assert len(auto.train) == 120  # type: ignore[arg-type]
    labels = FashionMNISTDataModule(str(data_dir), task="classification")
    labels.setup("fit")
    _, y = next(iter(labels.val_dataloader()))
    assert y.dtype == torch.int64
    assert y.shape == (100,)


def test_data_module_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"task.*'autoencoder', 'classification'"):
        FashionMNISTDataModule(task="segmentation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(FileNotFoundError, match="download=True"):
        FashionMNISTDataModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"download=True.*data_dir"):
        FashionMNISTDataModule(download=True)


def test_download_refuses_bad_checksums_and_explains_network_errors(tmp_path: Path) -> None:
    mirror = fake_fashion_mnist(tmp_path / "mirror")
    with pytest.raises(ValueError, match="SHA-256"):
        download_fashion_mnist(tmp_path / "out", url=mirror.as_uri() + "/")
    assert not list((tmp_path / "out").glob("*"))  # nothing corrupt left behind
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        download_fashion_mnist(tmp_path / "out", url=(tmp_path / "nowhere").as_uri() + "/")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_download_from_a_mirror_with_the_real_files(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(DEBIAN_FASHION_MNIST, mirror)
    out = download_fashion_mnist(tmp_path / "data", url=mirror.as_uri() + "/")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in mirror.iterdir())
    data = FashionMNISTDataModule(str(out), task="classification")
    data.prepare_data()
    data.setup("fit")
    assert len(data.train) == 60000  # type: ignore[arg-type]


def run_cli(args: list[str]) -> None:
    main(args)


def test_fls_fit_runs_the_autoencoder_config(tmp_path: Path) -> None:
    data_dir = fake_fashion_mnist(tmp_path / "fmnist")
    run_cli([
        "fit", "--config", str(ROOT / "examples/configs/autoencoder.yaml"),
        "--data.init_args.data_dir", str(data_dir),
        "--model.init_args.sizes", "[784, 40, 10, 40, 784]",
        "--trainer.max_epochs", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.start_epoch", "0",
        "--trainer.callbacks.init_args.end_epoch", "2",
        "--trainer.callbacks.init_args.aux_every_n_steps", "1",
    ])  # fmt: skip
    [metrics] = list((tmp_path / "runs").glob("autoencoder/version_*/metrics.csv"))
    text = metrics.read_text()
    assert "fls/sparsity" in text
    assert "fls/realised_loss_increase" in text
    config = yaml.safe_load(
        next((tmp_path / "runs").glob("autoencoder/version_*/config.yaml")).read_text()
    )
    [callback] = config["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_fls.FLSPruningCallback"


def test_print_config_shows_documented_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            ["fit", "--config", str(ROOT / "examples/configs/classifier.yaml"), "--print_config"]
        )
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    [callback] = config["trainer"]["callbacks"]
    args = callback["init_args"]
    assert args["target_sparsity"] == 0.95
    assert args["aux_every_n_steps"] == 10
    assert args["samples_per_step"] == 1024
    assert args["method"] == "fls"


def test_callback_help_explains_every_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(["fit", "--trainer.callbacks.help", "lightning_fls.FLSPruningCallback"])
    text = capsys.readouterr().out
    for argument in [
        "target_sparsity",
        "schedule",
        "start_epoch",
        "end_epoch",
        "method",
        "scope",
        "include",
        "exclude",
        "damping",
        "aux_every_n_steps",
        "samples_per_step",
    ]:
        assert f"--trainer.callbacks.{argument}" in text or f".{argument} " in text, argument
    assert (
        "Record the training step's per-example gradients"
        in text.replace("\n", " ").replace("  ", " ")
        or "per-example" in text
    )


def test_the_yaml_block_works_in_a_users_own_cli(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 2\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_fls.FLSPruningCallback\n"
        "      init_args: {target_sparsity: 0.5, start_epoch: 0, end_epoch: 1,\n"
        "                  aux_every_n_steps: 1}\n"
    )
    cli = LightningCLI(TinyClassifier, args=["fit", "--config", str(config)])
    [pruning] = [c for c in cli.trainer.callbacks if type(c).__name__ == "FLSPruningCallback"]
    assert pruning.history[-1]["fls/sparsity"] == pytest.approx(0.5, abs=1 / 384)


def test_fls_fit_prunes_the_transformer_config_to_2_4(tmp_path: Path) -> None:
    from lightning_fls import follows_pattern, parse_pattern

    data_dir = fake_fashion_mnist(tmp_path / "fmnist")
    run_cli([
        "fit", "--config", str(ROOT / "examples/configs/transformer_2of4.yaml"),
        "--data.init_args.data_dir", str(data_dir),
        "--trainer.max_epochs", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.start_epoch", "0",
        "--trainer.callbacks.init_args.end_epoch", "2",
        "--trainer.callbacks.init_args.aux_every_n_steps", "1",
    ])  # fmt: skip
    [checkpoint] = list(tmp_path.glob("runs/transformer_2of4/version_*/checkpoints/*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    two_four = parse_pattern("2:4")
    assert two_four is not None
    pruned = [k for k in state if k.startswith("blocks.") and k.endswith("weight")
              and state[k].dim() == 2]  # fmt: skip
    assert len(pruned) == 8  # in_proj, out_proj, fc1, fc2 in each of the 2 blocks
    for key in pruned:
        assert follows_pattern(state[key], two_four), key
    assert not follows_pattern(state["head.weight"], two_four)
