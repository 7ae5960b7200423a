"""`python -m benchmarks.structured --quick` end to end on a small fake Fashion-MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import benchmarks.common
from tests.helpers import fake_fashion_mnist

pytest.importorskip("torch_pruning")

from benchmarks.structured import CONFIGS, METHODS, OURS, RATIOS, main


@pytest.mark.filterwarnings("ignore")  # Torch-Pruning's and the OBS safeguard's warnings
def test_quick_structured_benchmark_writes_every_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmarks.common, "CODE_VERSION", {"commit": "a" * 40, "dirty": False})
    data = fake_fashion_mnist(tmp_path / "fmnist", train=300, test=100)
    path = main(["--quick", "--data-dir", str(data), "--out", str(tmp_path)])
    assert path == tmp_path / "structured_quick.json"
    assert (tmp_path / "plots" / "structured_quick.png").is_file()
    result = json.loads(path.read_text())
    runs = {(r["config"], r["method"], r["ratio"]): r for r in result["runs"]}
    expected = {
        (config, method, ratio)
        for config, (_, granularity) in CONFIGS.items()
        for method in METHODS
        for ratio in RATIOS
        if granularity != "head" or method in OURS
    }
    assert set(runs) == expected
    for (config, method, _), run in runs.items():
        for key in ("metric", "metric_finetuned"):
            assert math.isfinite(run[key]), (config, method, key)
            assert 0.0 <= run[key] <= 1.0, (config, method, key)
        assert 0 < run["params"] < run["params_dense"], (config, method)
        assert run["latency_b1"] > 0
        assert run["latency_b64"] > 0
        assert 0 < run["flops"] <= run["flops_dense"]
        assert (run["tp_ratio"] is None) == (method in OURS)
    assert len(result["summary"]) == len(expected)
