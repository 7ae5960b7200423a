"""Print the committed benchmark JSON as Markdown tables (used to write docs/pruning.md)."""

from __future__ import annotations

import json
import sys

from benchmarks.common import RESULTS_DIR


def oneshot(name: str) -> None:
    data = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    extra_path = RESULTS_DIR / f"{name}_extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {"tasks": {}}
    for task, result in data["tasks"].items():
        more = extra["tasks"].get(task, {}).get("rows", [])
        rows = more + result["rows"]
        if more:
            print(f"\n(rows {sorted({r['method'] for r in more})}: `{extra['command']}`)")
        methods = list(dict.fromkeys(r["method"] for r in rows))
        sparsities = sorted({r["sparsity"] for r in rows})
        print(
            f"\n**{task}** ({result['metric']}; dense {result['dense']:.4f}; `{data['command']}`)\n"
        )
        print("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " | s/run |")
        print("|---|" + "---|" * (len(sparsities) + 1))
        for method in methods:
            cells, secs = [], []
            for s in sparsities:
                row = next(r for r in rows if r["method"] == method and r["sparsity"] == s)
                cells.append(f"{row['metric_mean']:.4f} ± {row['metric_std']:.4f}")
                secs.append(row["seconds_mean"])
            print(f"| {method} | " + " | ".join(cells) + f" | {sum(secs) / len(secs):.1f} |")


def estimator_cost() -> None:
    data = json.loads((RESULTS_DIR / "estimator_cost.json").read_text())
    print(f"\nTime to build the estimate ({data['timing_model']}, gradients of batches of 16):\n")
    sizes = list(data["timing"])
    methods = list(data["timing"][sizes[0]])
    print("| method | " + " | ".join(f"N = {n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for m in methods:
        cells = []
        for n in sizes:
            r = data["timing"][n][m]
            cells.append(f"{r['seconds']:.2f} s ({r['seconds_over_fls']:.2f}× FLS)")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"\nPeak memory growth while building it from {data['memory_samples']} samples:\n")
    models = list(data["memory"])
    print("| method | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for m in methods:
        cells = []
        for model in models:
            r = data["memory"][model][m]
            peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MB"
            cells.append(f"{peak} (estimate {r['state_mb']:.0f} MB)")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["oneshot_quality_classifier", "oneshot_quality_autoencoder"]:
        if arg == "estimator_cost":
            estimator_cost()
        else:
            oneshot(arg)
