from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curvature_quickstart_improves_on_the_identity() -> None:
    errors = load("curvature_quickstart").main(aux_steps=100)
    assert errors["kfac"] < 0.8 * errors["identity"]
    assert errors["refined"] < 0.8 * errors["identity"]


def test_prune_autoencoder_example_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import fake_fashion_mnist

    data_dir = fake_fashion_mnist(tmp_path / "fmnist", train=200, test=100)
    monkeypatch.chdir(tmp_path)
    results = load("prune_autoencoder").main(
        ["--preset", "smoke", "--data-dir", str(data_dir), "--sparsity", "0.8"]
    )
    assert results["dense"]["sparsity"] == 0.0
    assert abs(results["pruned"]["sparsity"] - 0.8) < 1e-4
    assert all(math.isfinite(r["test_loss"]) for r in results.values())
    assert list((tmp_path / "runs").glob("autoencoder_pruned/version_0/metrics.csv"))


def test_prune_autoencoder_example_shows_no_lightning_notices(tmp_path: Path) -> None:
    from tests.helpers import fake_fashion_mnist

    # As a user runs it: a fresh interpreter, without pytest's capture and warning filters.
    data_dir = fake_fashion_mnist(tmp_path / "fmnist", train=200, test=100)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, str(EXAMPLES / "prune_autoencoder.py"), "--preset", "smoke"]
    result = subprocess.run(
        [*command, "--data-dir", str(data_dir)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Epoch 1: 100%" in result.stdout  # the progress bar
    assert "pruned vs dense: test loss" in result.stdout  # the result table
    # Lightning's litlogger advert and torch's deprecation warning about Lightning's pytree helper.
    assert "Tip:" not in output
    assert "litlogger" not in output
    assert "_pytree" not in output


def test_prune_transformer_example_runs_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import fake_fashion_mnist

    data_dir = fake_fashion_mnist(tmp_path / "fmnist", train=300, test=100)
    monkeypatch.chdir(tmp_path)
    results = load("prune_transformer").main(
        ["--epochs", "1", "--prune-epochs", "1", "--data-dir", str(data_dir), "--samples", "100"]
    )
    assert results["dense"]["sparsity"] == 0.0
    for name, result in results.items():
        if "2:4" in name:
            assert result["2:4"], name
            assert result["sparsity"] == pytest.approx(0.5)
        elif name != "dense":
            assert result["sparsity"] == pytest.approx(0.7, abs=1e-3)
        assert 0.0 <= result["accuracy"] <= 1.0
    assert set(results) >= {"one-shot fls 2:4", "one-shot sparsegpt 0.7", "gradual fls 2:4"}
