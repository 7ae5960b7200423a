"""`python -m benchmarks.report` draws every figure from the committed JSON; skips missing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import RESULTS_DIR
from benchmarks.report import ONESHOT_TASKS, main, make_report, time_to_quality_curves
from benchmarks.time_to_quality import summarise

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
if (RESULTS_DIR / "structured.json").is_file():
    EXPECTED.append("structured")
if (RESULTS_DIR / "structured_gradual.json").is_file():
    EXPECTED.append("structured_gradual")
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


def test_time_to_quality_draws_every_method_curve(tmp_path: Path) -> None:
    def row(method: str, samples: int, accuracy: float, seconds: float) -> dict[str, object]:
        return {
            "method": method,
            "samples_per_step": samples,
            "gradients_per_step": None if method == "fls" else samples // 16,
            "accuracy": accuracy,
            "seconds": seconds,
            "curvature_seconds": seconds * 0.99,
        }

    curves = {
        method: [row(method, s, 0.80 + s / 10_000 + bonus, s / 50 + base) for s in (128, 256)]
        for method, bonus, base in (("fls", 0.05, 10.0), ("obert", 0.0, 1.0), ("mfac", 0.0, 2.0))
    }
    # A failed run keeps its error and no accuracy: it is left out of the curve.
    curves["mfac"].append(
        {"method": "mfac", "samples_per_step": 512, "gradients_per_step": 32, "error": "E: x"}
    )
    payload = {
        "sparsity": 0.9,
        "steps": 16,
        "reference": {**row("obert", 16_384, 0.86, 200.0), "gradients_per_step": 1024},
        "curves": curves,
    }
    (tmp_path / "time_to_quality.json").write_text(json.dumps(payload))
    written = make_report(tmp_path, tmp_path / "plots")
    assert tmp_path / "plots" / "time_to_quality.png" in written
    assert_png(tmp_path / "plots" / "time_to_quality.png")
    reference, drawn = time_to_quality_curves(payload)
    assert reference["gradients_per_step"] == 1024
    assert sorted(drawn) == ["fls", "mfac", "obert"]
    assert [r["samples_per_step"] for r in drawn["mfac"]] == [128, 256]
    # The earlier layout (oBERT's reference and FLS's curve only) still reads.
    earlier = {"obert_m1024": payload["reference"], "fls": curves["fls"]}
    assert sorted(time_to_quality_curves(earlier)[1]) == ["fls"]


def test_time_to_quality_summary_matches_the_reference_accuracy() -> None:
    def row(samples: int, accuracy: float, seconds: float) -> dict[str, object]:
        return {"samples_per_step": samples, "accuracy": accuracy, "seconds": seconds}

    reference = row(16_384, 0.86, 200.0)
    curves = {
        "fls": [row(256, 0.87, 20.0), row(128, 0.86, 10.0)],
        "obert": [row(128, 0.80, 2.0), {"samples_per_step": 256, "error": "E: x"}],
        "mfac": [row(128, 0.85, 4.0), row(256, 0.861, 50.0)],
    }
    summary = summarise(reference, curves)
    assert summary["first_matching"]["fls"]["samples_per_step"] == 128
    assert summary["first_matching"]["obert"] is None
    assert summary["speedup_vs_reference"] == {"fls": 20.0, "obert": None, "mfac": 4.0}
    assert summary["seconds_vs_fls"] == {"fls": 1.0, "obert": None, "mfac": 5.0}
