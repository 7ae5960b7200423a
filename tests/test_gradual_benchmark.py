"""`python -m benchmarks.gradual --quick` end to end on a small fake Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.common
from benchmarks.gradual import main
from tests.helpers import fake_fashion_mnist


def pin_code_version(monkeypatch: pytest.MonkeyPatch, commit: str) -> None:
    version = {"commit": commit, "dirty": False}
    monkeypatch.setattr(benchmarks.common, "CODE_VERSION", version)


@pytest.mark.filterwarnings("ignore:.*`training_step` returned.*")
def test_quick_gradual_benchmark_writes_every_run_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_code_version(monkeypatch, "a" * 40)
    data = fake_fashion_mnist(tmp_path / "fmnist", train=400, test=100)
    argv = ["--quick", "--tasks", "cnn", "--data-dir", str(data), "--out", str(tmp_path)]
    argv += ["--train-size", "400"]
    [path] = main(argv)
    result = json.loads(path.read_text())
    assert path.name == "gradual_cnn_quick.json"
    runs = {(r["method"], r["sparsity_target"]): r for r in result["runs"]}
    assert set(runs) == {("dense", 0.0), ("fls", 0.9), ("magnitude", 0.9)}
    assert runs[("dense", 0.0)]["sparsity"] == 0.0
    for method in ("fls", "magnitude"):
        run = runs[(method, 0.9)]
        assert run["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert 0.0 <= run["metric"] <= 1.0
        assert run["history"][-1]["fls/sparsity"] == pytest.approx(0.9, abs=1e-3)
    # A second call finds every run done under the same protocol and repeats none.
    before = path.read_text()
    main(argv)
    assert json.loads(path.read_text())["runs"] == json.loads(before)["runs"]
    assert result["code"] == {"commit": "a" * 40, "dirty": False}
    # Other code: the runs are not mixed; the file is kept until --restart measures anew.
    pin_code_version(monkeypatch, "b" * 40)
    with pytest.raises(SystemExit, match="never mixed"):
        main(argv)
    assert path.read_text() == before
