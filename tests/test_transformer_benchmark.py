"""`python -m benchmarks.transformer --quick` end to end on a small fake Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.common
from benchmarks.transformer import main, target_options
from tests.helpers import fake_fashion_mnist


def test_targets_are_read_or_refused() -> None:
    assert target_options("0.7") == (0.7, None)
    assert target_options("2:4") == (0.5, "2:4")
    with pytest.raises(ValueError, match="pattern"):
        target_options("2:2")


@pytest.mark.filterwarnings("ignore:.*`training_step` returned.*")
def test_quick_transformer_benchmark_writes_every_run_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmarks.common, "CODE_VERSION", {"commit": "a" * 40, "dirty": False})
    data = fake_fashion_mnist(tmp_path / "fmnist", train=300, test=100)
    argv = ["--quick", "--data-dir", str(data), "--out", str(tmp_path), "--train-size", "300",
            "--targets", "0.7", "2:4"]  # fmt: skip
    path = main(argv)
    assert path.name == "transformer_quick.json"
    runs = {(r["mode"], r["method"], r["target"]): r for r in json.loads(path.read_text())["runs"]}
    methods = ("fls", "sparsegpt", "magnitude")
    expected = {("dense", "dense", "0"), ("gradual", "dense", "0")} | {
        (mode, method, target)
        for mode in ("oneshot", "gradual")
        for method in methods
        for target in ("0.7", "2:4")
    }
    assert set(runs) == expected
    for (mode, method, target), run in runs.items():
        assert 0.0 <= run["metric"] <= 1.0
        if method == "dense":
            assert run["sparsity"] == 0.0
        elif target == "2:4":
            assert run["follows_pattern"], (mode, method)
            assert run["sparsity"] == pytest.approx(0.5)
        else:
            assert run["sparsity"] == pytest.approx(0.7, abs=1e-3)
    before = path.read_text()
    main(argv)  # resumes: nothing left to run
    assert json.loads(path.read_text())["runs"] == json.loads(before)["runs"]
    monkeypatch.setattr(benchmarks.common, "CODE_VERSION", {"commit": "a" * 40, "dirty": True})
    with pytest.raises(SystemExit, match="never mixed"):
        main(argv)  # uncommitted code does not resume either
