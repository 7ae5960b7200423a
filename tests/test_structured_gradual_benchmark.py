"""`python -m benchmarks.structured_gradual --quick` end to end on a small fake Fashion-MNIST."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import benchmarks.common
from tests.helpers import fake_fashion_mnist

pytest.importorskip("torch_pruning")

from benchmarks.structured_gradual import DEFAULT_METHODS, GRADUAL_CONFIGS, main


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # Torch-Pruning's, Lightning's and the safeguard's warnings
def test_quick_gradual_benchmark_follows_one_size_trajectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmarks.common, "CODE_VERSION", {"commit": "a" * 40, "dirty": False})
    data = fake_fashion_mnist(tmp_path / "fmnist", train=300, test=100)
    path = main(["--quick", "--ratios", "0.5", "--data-dir", str(data), "--out", str(tmp_path)])
    assert path == tmp_path / "structured_gradual_quick.json"
    assert (tmp_path / "plots" / "structured_gradual_quick.png").is_file()
    result = json.loads(path.read_text())
    runs = {(r["config"], r["method"]): r for r in result["runs"]}
    assert set(runs) == {(c, m) for c in GRADUAL_CONFIGS for m in DEFAULT_METHODS}
    for (config, method), run in runs.items():
        for key in ("metric", "acc_pruned"):
            assert 0.0 <= run[key] <= 1.0, (config, method, key)
            assert math.isfinite(run[key])
        assert 0 < run["params"] < run["params_dense"], (config, method)
        # The last pruning point's size is the final size: fine-tuning removes nothing more.
        assert run["params"] == run["params_points"][-1], (config, method)
        fls = runs[(config, "fls")]["params_points"]
        assert len(run["params_points"]) == len(fls) >= 1
        # Torch-Pruning's ratio is bisected to fls's compacted size at every point.
        for theirs, ours in zip(run["params_points"], fls, strict=True):
            assert abs(theirs - ours) <= 0.05 * ours, (config, method, theirs, ours)
    assert len(result["summary"]) == len(runs)
