"""`python -m benchmarks.structured_latency --quick` end to end on a small fake Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.common
from benchmarks.structured_latency import main
from tests.helpers import fake_fashion_mnist


@pytest.mark.filterwarnings("ignore")  # the OBS safeguard's warnings on a barely trained model
def test_quick_latency_benchmark_times_every_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmarks.common, "CODE_VERSION", {"commit": "a" * 40, "dirty": False})
    data = fake_fashion_mnist(tmp_path / "fmnist", train=300, test=100)
    argv = ["--quick", "--configs", "cnn", "mlp", "--ratios", "0.5", "--batches", "1", "8"]
    path = main([*argv, "--data-dir", str(data), "--out", str(tmp_path)])
    assert path == tmp_path / "structured_latency_quick.json"
    rows = json.loads(path.read_text())["rows"]
    assert [(r["config"], r["ratio"]) for r in rows] == [("cnn", 0.5), ("mlp", 0.5)]
    for row in rows:
        assert 0 < row["param_fraction"] < 1
        assert 0 < row["flops_ratio"] < 1
        assert list(row["latency"]) == ["1", "8"]
        for timing in row["latency"].values():
            assert timing["dense_ms"] > 0
            assert timing["ratio"] == pytest.approx(timing["pruned_ms"] / timing["dense_ms"])


def test_batches_larger_than_the_data_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--batches", "100000"])
