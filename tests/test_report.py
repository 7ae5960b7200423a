"""`python -m benchmarks.report` draws every figure from the committed JSON; skips missing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import RESULTS_DIR
from benchmarks.report import ONESHOT_TASKS, main, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ONESHOT = [f"oneshot_quality_{task}" for task in ONESHOT_TASKS]
OTHERS = [
    "estimator_cost",
    "curvature_cost",
    "training_overhead",
    "aux_convergence",
    "time_to_quality",
]
EXPECTED = [name for name in ONESHOT if (RESULTS_DIR / f"{name}.json").is_file()]
EXPECTED += [*OTHERS, "sparsity_schedule"] + [
    f"{path.stem}_{figure}"
    for path in sorted(RESULTS_DIR.glob("gradual_*.json"))
    if not path.stem.endswith("_quick")
    for figure in ("quality", "schedule", "layers")
]
if (RESULTS_DIR / "transformer.json").is_file():
    EXPECTED.append("transformer")
if (RESULTS_DIR / "pretrained.json").is_file():
    EXPECTED.append("pretrained")
if (RESULTS_DIR / "robustness.json").is_file():
    robustness = json.loads((RESULTS_DIR / "robustness.json").read_text())
    EXPECTED += [f"robustness_{task}" for task in robustness["tasks"]]


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 20_000, f"{path} is only {len(data)} bytes"


def test_report_draws_every_figure_from_the_committed_json(tmp_path: Path) -> None:
    written = make_report(RESULTS_DIR, tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in EXPECTED)
    for name in EXPECTED:
        assert_png(tmp_path / f"{name}.png")


def test_committed_plots_are_the_expected_ones() -> None:
    for name in EXPECTED:
        assert_png(RESULTS_DIR / "plots" / f"{name}.png")


def test_missing_results_are_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, out = tmp_path / "results", tmp_path / "plots"
    results.mkdir()
    main(["--results", str(results), "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ONESHOT + OTHERS:
        assert f"{name}.json not found" in printed
        assert not (out / f"{name}.png").exists()
    # The schedule figure needs no result file.
    assert_png(out / "sparsity_schedule.png")


def test_gradual_results_add_their_figures(tmp_path: Path) -> None:
    def history(target: float) -> list[dict[str, float]]:
        return [
            {
                "epoch": float(t),
                "fls/sparsity": target * f,
                "fls/target_sparsity": target * f,
                "fls/sparsity/net.0.weight": target * f * 0.9,
                "fls/sparsity/net.2.weight": min(target * f * 1.1, 1.0),
            }
            for t, f in ((1, 0.6), (2, 0.9), (3, 1.0))
        ]

    runs = [
        {"method": "dense", "sparsity_target": 0.0, "seed": seed, "metric": 0.9} for seed in (0, 1)
    ] + [
        {
            "method": method,
            "sparsity_target": target,
            "seed": seed,
            "metric": 0.9 - target / 10 - seed / 100,
            "history": history(target),
        }
        for method in ("fls", "magnitude")
        for target in (0.7, 0.9)
        for seed in (0, 1)
    ]
    payload = {
        "task": "tiny",
        "metric": "test_acc",
        "protocol": {"prune_epochs": 3, "finetune_epochs": 1},
        "runs": runs,
    }
    (tmp_path / "gradual_tiny.json").write_text(json.dumps(payload))
    (tmp_path / "gradual_tiny_quick.json").write_text(json.dumps(payload))  # ignored
    written = make_report(tmp_path, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == [
        "gradual_tiny_layers.png",
        "gradual_tiny_quality.png",
        "gradual_tiny_schedule.png",
        "sparsity_schedule.png",
    ]
    for path in written:
        assert_png(path)
