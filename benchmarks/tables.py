"""Print the committed benchmark JSON as Markdown tables (used to write docs/pruning.md).

The loaders here (:func:`load_result`, :func:`oneshot_tasks`) are shared with
``benchmarks/report.py``, which plots the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR


def load_result(name: str, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    """The committed result ``<results_dir>/<name>.json``."""
    data: dict[str, Any] = json.loads((results_dir / f"{name}.json").read_text())
    return data


def oneshot_tasks(name: str, results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """Each task of a one-shot quality result, with the ``<name>_extra.json`` rows merged in.

    Returns ``{task: {...}}`` with the task's ``metric`` and ``dense`` value, ``rows`` (the
    extra file's rows first), ``methods`` (in that order), ``sparsities`` (sorted), the
    ``command`` that produced the main file and, when the extra file adds rows to the task,
    ``extra_methods`` and ``extra_command``.
    """
    data = load_result(name, results_dir)
    extra_path = results_dir / f"{name}_extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {"tasks": {}}
    tasks: dict[str, dict[str, Any]] = {}
    for task, result in data["tasks"].items():
        more = extra["tasks"].get(task, {}).get("rows", [])
        rows = more + result["rows"]
        tasks[task] = {
            "metric": result["metric"],
            "dense": result["dense"],
            "rows": rows,
            "methods": list(dict.fromkeys(r["method"] for r in rows)),
            "sparsities": sorted({r["sparsity"] for r in rows}),
            "command": data["command"],
            "extra_methods": sorted({r["method"] for r in more}),
            "extra_command": extra.get("command") if more else None,
        }
    return tasks


def _cell(row: dict[str, Any]) -> str:
    errors = len(row.get("errors", []))
    if row["metric_mean"] is None:
        return f"error ×{errors}"
    text = f"{row['metric_mean']:.4f} ± {row['metric_std']:.4f}"
    return text + (f" (+{errors} error)" if errors else "")


def oneshot(name: str) -> None:
    for task, result in oneshot_tasks(name).items():
        rows, methods, sparsities = result["rows"], result["methods"], result["sparsities"]
        if result["extra_methods"]:
            print(f"\n(rows {result['extra_methods']}: `{result['extra_command']}`)")
        print(
            f"\n**{task}** ({result['metric']}; dense {result['dense']:.4f}; "
            f"`{result['command']}`)\n"
        )
        print("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " | s/run |")
        print("|---|" + "---|" * (len(sparsities) + 1))
        for method in methods:
            cells, secs = [], []
            for s in sparsities:
                row = next(r for r in rows if r["method"] == method and r["sparsity"] == s)
                cells.append(_cell(row))
                if row["seconds_mean"] is not None:
                    secs.append(row["seconds_mean"])
            mean_secs = f"{sum(secs) / len(secs):.1f}" if secs else "—"
            print(f"| {method} | " + " | ".join(cells) + f" | {mean_secs} |")


def oneshot_summary(names: list[str]) -> None:
    """FLS against the better of oBERT and M-FAC, task by task (positive: FLS is better)."""
    print("\n| task | sparsity | fls | obert | mfac | fls − better of the two |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for task, result in oneshot_tasks(name).items():
            sign = -1.0 if "lower" in result["metric"] else 1.0
            for s in result["sparsities"]:
                chosen = {
                    r["method"]: r["metric_mean"]
                    for r in result["rows"]
                    if r["sparsity"] == s and r["method"] in ("fls", "obert", "mfac")
                }
                if len(chosen) < 3 or None in chosen.values():
                    continue
                best = max(sign * chosen["obert"], sign * chosen["mfac"])
                print(
                    f"| {task} | {s:.0%} | {chosen['fls']:.4f} | {chosen['obert']:.4f} | "
                    f"{chosen['mfac']:.4f} | {sign * chosen['fls'] - best:+.4f} |"
                )


def estimator_cost() -> None:
    data = load_result("estimator_cost")
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


def gradual(name: str) -> None:
    """Metric per method and target sparsity (mean ± std over seeds) of a gradual run."""
    data = load_result(name)
    runs = data["runs"]
    protocol = data["protocol"]
    seeds = sorted({r["seed"] for r in runs})
    dense = [r["metric"] for r in runs if r["method"] == "dense"]
    targets = sorted({r["sparsity_target"] for r in runs if r["method"] != "dense"})
    print(
        f"\n**{data['task']}** ({data['metric']}, {data['better']} is better; "
        f"{protocol['prune_epochs']} pruning + {protocol['finetune_epochs']} fine-tuning epochs "
        f"after {protocol['dense_epochs']} dense, {protocol['train_images']} training images, "
        f"{len(seeds)} seeds; dense trained as long: {_mean_std(dense)}; `{data['command']}`)\n"
    )
    print("| method | " + " | ".join(f"{t:.0%}" for t in targets) + " | s/run |")
    print("|---|" + "---|" * (len(targets) + 1))
    for method in dict.fromkeys(r["method"] for r in runs if r["method"] != "dense"):
        cells, secs = [], []
        for t in targets:
            chosen = [r for r in runs if r["method"] == method and r["sparsity_target"] == t]
            cells.append(_mean_std([r["metric"] for r in chosen]) if chosen else "—")
            secs += [r["seconds"] for r in chosen]
        print(f"| {method} | " + " | ".join(cells) + f" | {sum(secs) / len(secs):.0f} |")


def transformer(name: str = "transformer") -> None:
    """Accuracy per method and target (mean ± std over seeds), one table per mode."""
    data = load_result(name)
    runs = data["runs"]
    protocol = data["protocol"]
    seeds = sorted({r["seed"] for r in runs})
    dense = [r["metric"] for r in runs if r["mode"] == "dense"]
    targets = list(dict.fromkeys(r["target"] for r in runs if r["method"] != "dense"))
    print(
        f"\n{protocol['model']}, {protocol['dense_epochs']} dense epochs, "
        f"{protocol['train_images']} training images, {len(seeds)} seeds; dense: "
        f"{_mean_std(dense)}; `{data['command']}`"
    )
    for mode in ("oneshot", "gradual"):
        chosen_mode = [r for r in runs if r["mode"] == mode]
        if not chosen_mode:
            continue
        reference = [r["metric"] for r in chosen_mode if r["method"] == "dense"]
        chosen_mode = [r for r in chosen_mode if r["method"] != "dense"]
        print(f"\n**{mode}**" + (f" (dense trained as long: {_mean_std(reference)})"
                                  if reference else "") + "\n")  # fmt: skip
        print(
            "| method | " + " | ".join(t if ":" in t else f"{float(t):.0%}" for t in targets) + " |"
        )
        print("|---|" + "---|" * len(targets))
        for method in dict.fromkeys(r["method"] for r in chosen_mode):
            cells = []
            for t in targets:
                chosen = [r for r in chosen_mode if r["method"] == method and r["target"] == t]
                cells.append(_mean_std([r["metric"] for r in chosen]) if chosen else "—")
            print(f"| {method} | " + " | ".join(cells) + " |")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4f} ± {std:.4f}"


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["oneshot_quality_classifier", "oneshot_quality_autoencoder"]:
        if arg == "summary":
            oneshot_summary(
                [
                    f"oneshot_quality_{task}"
                    for task in ("classifier", "autoencoder", "padded", "raw", "duplicated", "wide")
                    if (RESULTS_DIR / f"oneshot_quality_{task}.json").is_file()
                ]
            )
        elif arg == "estimator_cost":
            estimator_cost()
        elif arg.startswith("gradual_"):
            gradual(arg)
        elif arg.startswith("transformer"):
            transformer(arg)
        else:
            oneshot(arg)
