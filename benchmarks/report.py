"""Plot the committed benchmark JSON (``docs/results/*.json``) as PNGs in ``docs/results/plots/``.

    python -m benchmarks.report [--results DIR] [--out DIR]

One figure per question, each from the result file(s) named in :data:`PLOTS`; a missing file
skips its figure with a printed note. ``sparsity_schedule.png`` needs no benchmark data: it is
drawn from :class:`lightning_fls.SparsitySchedule` itself. The results of
``benchmarks.gradual`` (``gradual_<task>.json``, see :func:`plot_gradual`) add three figures per
task when present.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from benchmarks.common import RESULTS_DIR
from benchmarks.tables import load_result, oneshot_tasks

PLOTS_DIR = RESULTS_DIR / "plots"
DPI = 120

plt.rcParams.update(
    {
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 9,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "figure.titlesize": 13,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }
)

# One colour and marker per method, the same in every figure.
METHOD_STYLE: dict[str, dict[str, Any]] = {
    "fls": {"color": "C0", "marker": "o", "linewidth": 2.4, "zorder": 5},
    "obert+joint": {"color": "C1", "marker": "s"},
    "fls+kronecker": {"color": "C9", "marker": "D"},
    "kfac": {"color": "C4", "marker": "v"},
    "obert": {"color": "C3", "marker": "^"},
    "mfac": {"color": "C2", "marker": "P"},
    "diag_fisher": {"color": "C8", "marker": "X"},
    "magnitude": {"color": "C7", "marker": "*"},
    "sparsegpt": {"color": "C5", "marker": "h"},
    "wanda": {"color": "C6", "marker": "p"},
}
UNITS = {"autoencoder": "test loss (nats per image)"}


def style(method: str) -> dict[str, Any]:
    return {"linewidth": 1.6, "markersize": 6, **METHOD_STYLE.get(method, {})}


def save(fig: Figure, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def params_of(label: str) -> float:
    """Weights of a benchmark model from its label, e.g. ``"autoencoder (2.84 M)"`` → 2.84e6."""
    match = re.search(r"\(([\d.]+)\s*M\)", label)
    if match is None:
        raise ValueError(f"no parameter count in model label {label!r}")
    return float(match.group(1)) * 1e6


# 1. One-shot quality -------------------------------------------------------------------------


ONESHOT_TASKS = ("classifier", "autoencoder", "padded", "raw", "duplicated", "wide")
"""The tasks of ``benchmarks.oneshot_quality``, each with its own result file."""


def plot_oneshot(results: Path, out: Path) -> list[Path]:
    """Quality vs sparsity per method, one figure per task of :data:`ONESHOT_TASKS`.

    Left panel: every method; right panel: the same, zoomed on FLS and dense. Runs that ended
    in an error have no point.
    """
    paths = []
    for name in (f"oneshot_quality_{task}" for task in ONESHOT_TASKS):
        if not (results / f"{name}.json").exists():
            print(f"report: {name}.json not found in {results}; its figure is skipped")
            continue
        for task, result in oneshot_tasks(name, results).items():
            paths.append(save(_oneshot_figure(task, result), out, f"oneshot_quality_{task}"))
    return paths


def _oneshot_figure(task: str, result: dict[str, Any]) -> Figure:
    rows, dense = result["rows"], result["dense"]
    unit = UNITS.get(task, result["metric"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for method in result["methods"]:
            mine = sorted(
                (r for r in rows if r["method"] == method and r["metric_mean"] is not None),
                key=lambda r: r["sparsity"],
            )
            ax.errorbar(
                [100 * r["sparsity"] for r in mine],
                [r["metric_mean"] for r in mine],
                yerr=[r["metric_std"] for r in mine],
                label=method,
                capsize=3,
                **style(method),
            )
        ax.axhline(
            dense, color="black", linestyle="--", linewidth=1.2, label=f"dense ({dense:.4g})"
        )
        ax.set_xlabel("sparsity (% of prunable weights)")
        ax.set_ylabel(unit)
        ax.set_xticks([100 * s for s in result["sparsities"]])
        if zoom:
            focus = [
                r["metric_mean"]
                for r in rows
                if r["method"] == result["methods"][0] and r["metric_mean"] is not None
            ]
            low, high = min([*focus, dense]), max([*focus, dense])
            pad = 0.12 * (high - low)
            ax.set_ylim(low - pad, high + pad)
            ax.set_title(f"zoom on {result['methods'][0]} and dense")
        else:
            ax.set_title("all methods")
    better = "lower" if "lower" in result["metric"] or task == "autoencoder" else "higher"
    axes[0].legend(loc="best", ncol=1, framealpha=0.9)
    fig.suptitle(
        f"One-shot pruning, no fine-tuning: {task} ({better} is better; mean ± std over seeds)"
    )
    notes = [f"`{result['command']}`"]
    if result["extra_methods"]:
        notes.append(f"rows {', '.join(result['extra_methods'])}: `{result['extra_command']}`")
    fig.text(0.5, -0.01, "\n".join(notes), ha="center", va="top", fontsize=8, color="dimgray")
    fig.tight_layout()
    return fig


# 2. Cost of the curvature estimates ----------------------------------------------------------


def plot_estimator_cost(results: Path, out: Path) -> list[Path]:
    """Time and peak memory to build each estimate, vs samples and vs model size (log-log)."""
    data = load_result("estimator_cost", results)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    sizes = list(data["timing"])
    methods = list(data["timing"][sizes[0]])
    models = list(data["memory"])
    for method in methods:
        kw = style(method)
        timing = [data["timing"][n][method] for n in sizes]
        samples = [int(n) for n in sizes]
        axes[0, 0].plot(samples, [r["seconds"] for r in timing], label=method, **kw)
        axes[0, 1].plot(samples, [_peak(r) for r in timing], label=method, **kw)
        memory = [data["memory"][m][method] for m in models]
        params = [params_of(m) for m in models]
        axes[1, 0].plot(params, [r["seconds"] for r in memory], label=method, **kw)
        axes[1, 1].plot(params, [_peak(r) for r in memory], label=method, **kw)
        axes[1, 1].plot(
            params,
            [r["state_mb"] for r in memory],
            color=kw["color"],
            linestyle=":",
            marker=kw["marker"],
            markersize=4,
            alpha=0.7,
        )
    timing_model = data["timing_model"]
    axes[0, 0].set(
        xlabel="samples N (gradients of batches of 16)",
        ylabel="time to build the estimate (s)",
        title=f"Time vs samples ({timing_model})",
    )
    axes[0, 1].set(
        xlabel="samples N (gradients of batches of 16)",
        ylabel="peak memory growth (MB)",
        title=f"Peak memory vs samples ({timing_model})",
    )
    n = data["memory_samples"]
    axes[1, 0].set(
        xlabel="prunable weights of the model",
        ylabel="time to build the estimate (s)",
        title=f"Time vs model size (N = {n})",
    )
    axes[1, 1].set(
        xlabel="prunable weights of the model",
        ylabel="memory (MB)",
        title=f"Memory vs model size (N = {n})",
    )
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
    for ax in axes[0]:
        ax.set_xticks(samples, [str(s) for s in samples])
    for ax in axes[1]:
        ax.set_xticks(params, [f"{p / 1e6:.2f} M" for p in params])
        ax.minorticks_off()
    axes[0, 0].legend(loc="upper left")
    axes[1, 1].plot([], [], color="black", label="peak memory growth (solid)")
    axes[1, 1].plot([], [], color="black", linestyle=":", label="size of the estimate (dotted)")
    handles, labels = axes[1, 1].get_legend_handles_labels()
    axes[1, 1].legend(handles[-2:], labels[-2:], loc="lower right")
    fig.suptitle("Cost of building each inverse-curvature estimate (`benchmarks.estimator_cost`)")
    fig.tight_layout()
    return [save(fig, out, "estimator_cost")]


def _peak(row: dict[str, Any]) -> float:
    return math.nan if row.get("peak_mb") is None else float(row["peak_mb"])


STRUCTURE_LABEL = {
    "kronecker": "Kronecker with D, Gaussian probes",
    "kronecker_no_scale": "Kronecker, Gaussian probes",
    "kronecker_no_scale_outer_probe": "Kronecker, outer-product probes",
    "block_diagonal_50": "block-diagonal, B = 50",
    "diagonal": "diagonal",
}


def plot_curvature_cost(results: Path, out: Path) -> list[Path]:
    """Per-layer cost of Q·V and of one auxiliary step vs the layer's size, and state memory."""
    data = load_result("curvature_cost", results)
    variants = data["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.6), gridspec_kw={"width_ratios": [1, 1, 0.9]})
    for i, (name, v) in enumerate(variants.items()):
        layers = sorted(v["per_layer"].values(), key=lambda r: math.prod(r["shape"]))
        size = [math.prod(r["shape"]) for r in layers]
        kw = {"color": f"C{i}", "marker": "osD^v"[i % 5], "linestyle": "none", "markersize": 7}
        label = STRUCTURE_LABEL.get(name, name)
        axes[0].plot(size, [r["qv_over_train_step"] for r in layers], label=label, **kw)
        axes[1].plot(size, [r["aux_step_over_train_step"] for r in layers], label=label, **kw)
    labels = [STRUCTURE_LABEL.get(n, n) for n in variants]
    y = range(len(variants))
    state = [v["aux_state_mb"] for v in variants.values()]
    adam = [v["aux_state_with_adam_mb"] for v in variants.values()]
    axes[2].barh(y, adam, color="lightgray", label="with Adam state")
    axes[2].barh(y, state, color=[f"C{i}" for i in y], label="Q's parameters")
    for i, (s, a) in enumerate(zip(state, adam, strict=True)):
        axes[2].text(a * 1.1, i, f"{s:.0f} / {a:.0f} MB", va="center", fontsize=9)
    axes[2].set_yticks(list(y), labels)
    axes[2].invert_yaxis()
    axes[2].set_xscale("log")
    axes[2].set_xlim(1, max(adam) * 12)
    axes[2].set(xlabel="memory, all 8 layers (MB)", title="State of Q")
    axes[2].legend(loc="lower right")
    for ax, what in zip(axes[:2], ("one Q·V product", "one auxiliary step"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(
            xlabel="weights of the layer (bias column included)",
            ylabel=f"time of {what}\n/ time of one training step",
            title=f"{what[0].upper()}{what[1:]}, each of the 8 layers",
        )
    axes[0].legend(loc="upper left")
    step_ms = 1000 * data["train_step_seconds"]
    fig.suptitle(
        f"Curvature blocks on the {data['weights'] / 1e6:.2f} M-weight autoencoder "
        f"(batch {data['batch']}; one training step = {step_ms:.0f} ms; "
        "`benchmarks.curvature_cost`)"
    )
    fig.tight_layout()
    return [save(fig, out, "curvature_cost")]


# 3. Training overhead ------------------------------------------------------------------------


def plot_training_overhead(results: Path, out: Path) -> list[Path]:
    """Fit time over dense per configuration, the pruning part hatched, test loss annotated."""
    data = load_result("training_overhead", results)
    rows = data["results"]
    names = list(rows)
    ratio = [rows[n]["ratio_to_dense"] for n in names]
    dense_seconds = rows["dense"]["seconds"] if "dense" in rows else None
    prune = [
        rows[n].get("prune_seconds", 0.0) / dense_seconds if dense_seconds else 0.0 for n in names
    ]
    fig, ax = plt.subplots(figsize=(11, 0.75 * len(names) + 2))
    y = list(range(len(names)))
    colors = ["black" if n == "dense" else "C7" if n == "magnitude" else "C0" for n in names]
    ax.barh(y, ratio, color=colors, alpha=0.35, label="training (fit time / dense)")
    ax.barh(
        y,
        prune,
        left=[r - p for r, p in zip(ratio, prune, strict=True)],
        color=colors,
        alpha=0.8,
        hatch="//",
        label="of which pruning points",
    )
    for i, n in enumerate(names):
        ax.text(
            ratio[i] + 0.03,
            i,
            f"{ratio[i]:.2f}×   test loss {rows[n]['test_loss']:.2f}",
            va="center",
            fontsize=10,
        )
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(ratio) * 1.45)
    ax.set_xlabel("fit time / dense fit time")
    schedule = data["schedule"]
    ax.set_title(
        f"Gradual pruning overhead: autoencoder, {data['epochs']} epochs, {schedule['schedule']} "
        f"to {schedule['target_sparsity']:.0%}\n(start_epoch {schedule['start_epoch']}, "
        f"end_epoch {schedule['end_epoch']}; one run each; test loss in nats per image; "
        "`benchmarks.training_overhead`)"
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    return [save(fig, out, "training_overhead")]


# 4. Auxiliary-fit convergence ----------------------------------------------------------------


def plot_aux_convergence(results: Path, out: Path) -> list[Path]:
    """Held-out auxiliary loss vs aux steps, best learning rate per setting, one panel per start."""
    data = load_result("aux_convergence", results)
    steps = data["checkpoints"]
    runs = [r for r in data["results"] if r.get("held_out_aux_loss")]
    if not runs:
        print("report: aux_convergence.json has no curves; its figure is skipped")
        return []
    inits = list(dict.fromkeys(r["init"] for r in runs))
    fig, axes = plt.subplots(1, len(inits), figsize=(7 * len(inits), 5.4), squeeze=False)
    settings = list(dict.fromkeys((r["structure"], r["probe"], r["precondition"]) for r in runs))
    for ax, init in zip(axes[0], inits, strict=True):
        for i, (structure, probe, precondition) in enumerate(settings):
            mine = [
                r
                for r in runs
                if r["init"] == init
                and (r["structure"], r["probe"], r["precondition"])
                == (structure, probe, precondition)
            ]
            if not mine:
                continue
            best = min(mine, key=lambda r: _final(r, steps))
            curve = [best["held_out_aux_loss"][str(s)] for s in steps]
            ax.plot(
                steps,
                curve,
                color=f"C{i // 2}",
                linestyle="-" if precondition else "--",
                marker="o" if precondition else "s",
                label=f"{AUX_STRUCTURE.get(structure, structure)}, {probe} probes, "
                f"{'preconditioned' if precondition else 'plain'}, lr {best['lr']:g}",
            )
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xticks(steps, [str(s) for s in steps])
        if all(v > 0 for r in runs if r["init"] == init for v in r["held_out_aux_loss"].values()):
            ax.set_yscale("log")
        start = (
            "Q₀ = I/γ (paper)"
            if init == "paper"
            else "K-FAC statistics"
            if init == "kfac"
            else init
        )
        ax.set(
            xlabel="auxiliary steps",
            ylabel="held-out auxiliary loss (scale-free; lower is better)",
            title=f"Start: {start}",
        )
        ax.legend(loc="best")
    fig.suptitle(
        f"FishLeg auxiliary fit, {data['model']}\n(best learning rate of each setting; "
        "`benchmarks.aux_convergence`)"
    )
    fig.tight_layout()
    return [save(fig, out, "aux_convergence")]


AUX_STRUCTURE = {"kronecker": "Kronecker with D", "kronecker_no_scale": "Kronecker"}


def _final(run: dict[str, Any], steps: Sequence[int]) -> float:
    value = run["held_out_aux_loss"][str(steps[-1])]
    return math.inf if value is None or not math.isfinite(value) else float(value)


# 5. Time to quality --------------------------------------------------------------------------


def time_to_quality_curves(
    data: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The reference run and each method's runs of a ``time_to_quality`` result.

    Reads both layouts: ``reference`` and ``curves`` (one list per method), and the earlier
    ``obert_m1024`` and ``fls`` (FLS's curve only). Runs that failed (an ``error`` and no
    accuracy) are left out of the curves.

    Args:
        data: The loaded result file.

    Returns:
        ``(reference, {method: runs in order of samples per step})``.
    """
    reference = data.get("reference") or data["obert_m1024"]
    curves = data.get("curves") or {"fls": data["fls"]}
    return reference, {
        method: sorted((r for r in runs if "accuracy" in r), key=lambda r: r["samples_per_step"])
        for method, runs in curves.items()
    }


def plot_time_to_quality(results: Path, out: Path) -> list[Path]:
    """Accuracy vs wall time of each method at the same sample counts, and oBERT's reference.

    One curve per method through its sample counts in increasing order (each point annotated
    with its samples per step), the reference run (oBERT at its published m = 1024 gradients)
    as a large marker with its accuracy as a dotted line.
    """
    data = load_result("time_to_quality", results)
    reference, curves = time_to_quality_curves(data)
    fig, ax = plt.subplots(figsize=(9, 5.6))
    for method, runs in curves.items():
        ax.plot(
            [r["seconds"] for r in runs],
            [r["accuracy"] for r in runs],
            label=f"{method} (samples per step annotated)",
            **style(method),
        )
        for r in runs:
            ax.annotate(
                str(r["samples_per_step"]),
                (r["seconds"], r["accuracy"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
                color=style(method).get("color"),
            )
    method = reference.get("method", "obert")
    gradients = reference.get("gradients_per_step")
    setting = f"m = {gradients}, " if gradients else ""
    ax.plot(
        [reference["seconds"]],
        [reference["accuracy"]],
        linestyle="none",
        markersize=11,
        markeredgecolor="black",
        label=f"{method} reference ({setting}{reference['samples_per_step']} samples per step)",
        **{k: v for k, v in style(method).items() if k not in ("markersize", "linewidth")},
    )
    ax.axhline(reference["accuracy"], color=style(method)["color"], linestyle=":", linewidth=1)
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    candidates = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    ticks = [t for t in candidates if low / 1.3 <= t <= 1.3 * high]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low, high)
    ax.set(
        xlabel="wall time of the one-shot pruning run (s, log scale)",
        ylabel="test accuracy after pruning",
        title=f"Time to quality: classifier pruned to {data['sparsity']:.0%} in "
        f"{data['steps']} steps, no fine-tuning",
    )
    ax.margins(y=0.15)
    ax.legend(loc="best", framealpha=0.9)
    fig.tight_layout()
    return [save(fig, out, "time_to_quality")]


# 6. Sparsity schedule (no benchmark data) ----------------------------------------------------


def plot_sparsity_schedule(results: Path, out: Path) -> list[Path]:
    """Target sparsity vs epochs completed for the cubic and linear schedules."""
    del results  # drawn from the package, not from a result file
    from lightning_fls import SparsitySchedule

    target, start, end, epochs = 0.9, 2, 8, 10  # examples/configs/autoencoder.yaml
    fig, ax = plt.subplots(figsize=(9, 5.4))
    grid = [i / 50 for i in range(50 * epochs + 1)]
    points = list(range(start + 1, end + 1))  # the ends of epochs start+1 … end
    for i, name in enumerate(("cubic", "linear")):
        schedule = SparsitySchedule(name, target, start, end)
        color = f"C{i}"
        ax.plot(grid, [schedule(t) for t in grid], color=color, linestyle=":", linewidth=1.3)
        # The masks change only at pruning points: the sparsity is held in between.
        steps = [0, *points, epochs]
        held = [schedule(0), *[schedule(t) for t in points], schedule(points[-1])]
        ax.step(steps, held, where="post", color=color, linewidth=2, label=f"{name}")
        ax.plot(
            points,
            [schedule(t) for t in points],
            linestyle="none",
            marker="o",
            markersize=7,
            color=color,
        )
    ax.plot([], [], color="gray", linestyle=":", label="schedule s(t)")
    ax.plot([], [], color="gray", linewidth=2, label="sparsity in training (held between points)")
    ax.plot([], [], color="gray", marker="o", linestyle="none", label="pruning points (epoch ends)")
    ax.axvspan(start, end, color="gray", alpha=0.08, label="pruning window")
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xticks(range(epochs + 1))
    ax.set(
        xlabel="epochs completed t",
        ylabel="target sparsity (fraction of prunable weights)",
        title=f"Sparsity schedules (start_epoch={start}, end_epoch={end}, "
        f"target_sparsity={target})",
        ylim=(-0.02, 1.0),
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    return [save(fig, out, "sparsity_schedule")]


# Gradual pruning with fine-tuning (benchmarks.gradual) ---------------------------------------

GRADUAL_UNITS = {"test_loss": "test loss (nats per image)", "test_acc": "test accuracy"}


def plot_gradual(results: Path, out: Path) -> list[Path]:
    """Figures from each ``gradual_<task>.json`` written by ``benchmarks.gradual``.

    Per task: the metric against the target sparsity per method (mean ± std over seeds, the
    dense model trained as long as a dashed line); the scheduled and achieved sparsity of the
    ``fls`` run at the highest target over training; and the per-layer sparsity at the end for
    ``fls`` and magnitude at 90% (seed 0).
    """
    files = sorted(p for p in results.glob("gradual_*.json") if not p.stem.endswith("_quick"))
    if not files:
        print(f"report: no gradual_*.json in {results}; the gradual-run figures are skipped")
    paths = []
    for file in files:
        name = file.stem
        data = load_result(name, results)
        runs = data["runs"]
        task = data.get("task", name.removeprefix("gradual_"))
        metric = data["metric"]
        protocol = data["protocol"]

        fig, ax = plt.subplots(figsize=(8, 5))
        dense = [r["metric"] for r in runs if r["method"] == "dense"]
        if dense:
            ax.axhline(
                mean(dense), color="black", linestyle="--", linewidth=1,
                label=f"dense ({mean(dense):.4g})",
            )  # fmt: skip
        methods = [m for m in METHOD_STYLE if any(r["method"] == m for r in runs)]
        for method in methods:
            targets = sorted({r["sparsity_target"] for r in runs if r["method"] == method})
            values = [
                [r["metric"] for r in runs if r["method"] == method and r["sparsity_target"] == t]
                for t in targets
            ]
            ax.errorbar(
                [100 * t for t in targets], [mean(v) for v in values],
                yerr=[stdev(v) for v in values], capsize=3, label=method,
                **METHOD_STYLE[method],
            )  # fmt: skip
        seeds = len({r["seed"] for r in runs})
        ax.set(
            xlabel="target sparsity (% of prunable weights)",
            ylabel=GRADUAL_UNITS.get(metric, metric),
            title=(
                f"Gradual pruning + fine-tuning, {task}: {protocol['prune_epochs']} pruning "
                f"+ {protocol['finetune_epochs']} fine-tuning epochs ({seeds} seed(s))"
            ),
        )
        ax.title.set_fontsize(11)
        ax.legend()
        fig.tight_layout()
        paths.append(save(fig, out, f"{name}_quality"))

        fls_runs = [r for r in runs if r["method"] == "fls" and r.get("history")]
        if fls_runs:
            top = max(fls_runs, key=lambda r: (r["sparsity_target"], -r["seed"]))
            history = top["history"]
            epochs = [0.0] + [h["epoch"] for h in history]
            fig, ax = plt.subplots(figsize=(8, 5))
            achieved = [0.0] + [h["fls/sparsity"] for h in history]
            scheduled = [0.0] + [h["fls/target_sparsity"] for h in history]
            ax.step(epochs, achieved, where="post", color="C0", linewidth=2, label="achieved")
            ax.plot(epochs, scheduled, "x", color="black", markersize=9, label="scheduled")
            ax.set(
                xlabel="epochs of pruning completed (pruning points)",
                ylabel="sparsity (fraction of prunable weights)",
                title=f"Cubic schedule to {top['sparsity_target']:g}, fls, {task}",
                ylim=(0, 1),
            )
            ax.legend(loc="lower right")
            fig.tight_layout()
            paths.append(save(fig, out, f"{name}_schedule"))

        prefix = "fls/sparsity/"
        layer_runs: dict[str, dict[str, Any]] = {}
        for method in ("fls", "magnitude"):
            candidates = [
                r
                for r in runs
                if r["method"] == method and r["sparsity_target"] == 0.9 and r.get("history")
            ]
            if candidates:
                layer_runs[method] = min(candidates, key=lambda r: r["seed"])
        if layer_runs:
            last = next(iter(layer_runs.values()))["history"][-1]
            layers = [k for k in last if k.startswith(prefix)]
            fig, ax = plt.subplots(figsize=(8, 0.45 * len(layers) * len(layer_runs) + 2))
            height = 0.8 / len(layer_runs)
            for i, (method, run) in enumerate(layer_runs.items()):
                final = run["history"][-1]
                ax.barh(
                    [j + i * height for j in range(len(layers))],
                    [final[k] for k in layers], height=height, label=method,
                    color=METHOD_STYLE[method]["color"],
                )  # fmt: skip
            ax.set_yticks(
                [j + height * (len(layer_runs) - 1) / 2 for j in range(len(layers))],
                [k[len(prefix) :] for k in layers],
            )
            ax.invert_yaxis()
            ax.set(
                xlabel="sparsity of the layer (fraction of its weights)",
                title=f"Per-layer sparsity at 90% overall, {task} (global ranking)",
                xlim=(0, 1),
            )
            ax.legend(loc="lower right")
            fig.tight_layout()
            paths.append(save(fig, out, f"{name}_layers"))
    return paths


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def stdev(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# Hyperparameter robustness (benchmarks.robustness) -------------------------------------------


def plot_robustness(results: Path, out: Path) -> list[Path]:
    """One panel per swept parameter: the metric against its value, the default marked."""
    data = load_result("robustness", results)
    paths = []
    for task, result in data["tasks"].items():
        params = list(dict.fromkeys(row["param"] for row in result["rows"].values()))
        fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 4), sharey=True)
        axes = [axes] if len(params) == 1 else list(axes)
        defaults = data["defaults"]
        for ax, param in zip(axes, params, strict=True):
            rows = [row for row in result["rows"].values() if row["param"] == param]
            labels = ["none" if row["value"] is None else f"{row['value']:g}" for row in rows]
            x = list(range(len(rows)))
            colors = ["C0" if row["value"] == defaults[param] else "C7" for row in rows]
            ax.bar(x, [row["mean"] for row in rows], yerr=[row["std"] for row in rows],
                   color=colors, capsize=3)  # fmt: skip
            ax.set_xticks(x, labels)
            ax.set_xlabel(
                {"aux_lr": "aux_lr (refine_passes=1)", "steps": "recomputation steps"}.get(
                    param, param
                )
            )
        lower = "loss" in result["metric"]
        values = [row["mean"] for row in result["rows"].values()]
        spread = max(values) - min(values)
        axes[0].set_ylim(min(values) - 0.3 * spread, max(values) + 0.3 * spread)
        axes[0].set_ylabel(result["metric"])
        gap = result["summary"].get("default_gap_percent")
        fig.suptitle(
            f"One-shot fls at {result['sparsity']:.0%}, {task}: one parameter moved at a time "
            f"(blue: default; {'lower' if lower else 'higher'} is better"
            + ("" if gap is None else f"; default {gap:.2f}% from the best")
            + ")"
        )
        fig.tight_layout()
        paths.append(save(fig, out, f"robustness_{task}"))
    return paths


# Transformer (benchmarks.transformer) ----------------------------------------------------------


def plot_transformer(results: Path, out: Path) -> list[Path]:
    """Test accuracy per target (unstructured and 2:4), one-shot and gradual, per method."""
    data = load_result("transformer", results)
    runs = data["runs"]
    dense = [r["metric"] for r in runs if r["mode"] == "dense"]
    modes = [m for m in ("oneshot", "gradual") if any(r["mode"] == m for r in runs)]
    targets = list(dict.fromkeys(r["target"] for r in runs if r["method"] != "dense"))
    methods = list(dict.fromkeys(r["method"] for r in runs if r["method"] != "dense"))
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4))
    axes = [axes] if len(modes) == 1 else list(axes)
    width = 0.8 / len(methods)
    for ax, mode in zip(axes, modes, strict=True):
        for i, method in enumerate(methods):
            values = [
                [r["metric"] for r in runs
                 if r["mode"] == mode and r["method"] == method and r["target"] == t]
                for t in targets
            ]  # fmt: skip
            x = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(targets))]
            ax.bar(x, [mean(v) if v else math.nan for v in values], width,
                   yerr=[stdev(v) if v else 0.0 for v in values], capsize=2, label=method,
                   color=METHOD_STYLE.get(method, {}).get("color"))  # fmt: skip
        longer = [r["metric"] for r in runs if r["mode"] == mode and r["method"] == "dense"]
        ax.axhline(mean(longer or dense), color="k", linestyle="--", linewidth=1,
                   label="dense, trained as long" if longer else "dense")  # fmt: skip
        ax.set_xticks(range(len(targets)),
                      [t if ":" in t else f"{float(t):.0%}" for t in targets])  # fmt: skip
        ax.set_xlabel("target (unstructured sparsity, or N:M pattern)")
        ax.set_ylabel("test accuracy")
        ax.set_title(
            {"oneshot": "one-shot, no fine-tuning", "gradual": "gradual + fine-tuning"}[mode]
        )
        if mode == "gradual":  # all close to dense: zoom in
            shown = [r["metric"] for r in runs if r["mode"] in ("gradual", "dense")]
            ax.set_ylim(min(shown) - 0.03, max(shown) + 0.01)
        else:
            ax.set_ylim(0.0, 1.0)
        ax.legend(loc="lower left", ncols=2)
    seeds = len({r["seed"] for r in runs})
    fig.suptitle(f"Patch transformer on Fashion-MNIST, pruned inside its blocks ({seeds} seeds)")
    fig.tight_layout()
    return [save(fig, out, "transformer")]


def plot_pretrained(results: Path, out: Path) -> list[Path]:
    """Embedding fidelity and retrieval agreement per target and method (pretrained MiniLM)."""
    runs = load_result("pretrained", results)["runs"]
    targets = list(dict.fromkeys(r["target"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(12.4, 4.4))
    width = 0.8 / len(methods)
    metrics = {"fidelity": "mean cosine to dense embeddings", "retrieval_at_10": "retrieval@10"}
    for ax, (metric, label) in zip(axes, metrics.items(), strict=True):
        for i, method in enumerate(methods):
            values = [
                mean([r[metric] for r in runs if r["method"] == method and r["target"] == t])
                if any(r["method"] == method and r["target"] == t for r in runs)
                else math.nan
                for t in targets
            ]
            x = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(targets))]
            ax.bar(x, values, width, label=method,
                   color=METHOD_STYLE.get(method, {}).get("color"))  # fmt: skip
        ax.set_xticks(range(len(targets)),
                      [t if ":" in t else f"{float(t):.0%}" for t in targets])  # fmt: skip
        ax.set_xlabel("target (unstructured sparsity, or N:M pattern)")
        ax.set_ylabel(label)
        ax.set_ylim(0.0, 1.0)
        ax.legend(loc="lower left", ncols=2)
    fig.suptitle("Pretrained all-MiniLM-L6-v2, one-shot with each method's defaults "
                 "(held-out Python documentation sentences)")  # fmt: skip
    fig.tight_layout()
    return [save(fig, out, "pretrained")]


STRUCTURED_STYLE: dict[str, dict[str, Any]] = {
    "fls": METHOD_STYLE["fls"],
    "magnitude": METHOD_STYLE["magnitude"],
    "tp_magnitude": {"color": "C3", "marker": "^", "linestyle": "--"},
    "tp_taylor": {"color": "C2", "marker": "P", "linestyle": "--"},
    "tp_hessian": {"color": "C1", "marker": "s", "linestyle": "--"},
}


def plot_structured(results: Path, out: Path, name: str = "structured") -> list[Path]:
    """Accuracy against the fraction of parameters kept, per model and method, both modes."""
    rows = load_result(name, results)["summary"]
    seeds = max(r["seeds"] for r in rows)
    panels = (("acc", "one-shot"), ("acc_finetuned", "fine-tuned"))
    title = f"Structured one-shot pruning on Fashion-MNIST ({seeds} seeds, mean ± std)"
    return [save(_structured_figure(rows, panels, title, "dense"), out, name)]


def plot_structured_gradual(
    results: Path, out: Path, name: str = "structured_gradual"
) -> list[Path]:
    """The gradual run: accuracy after the last pruning point and at the end, per model."""
    rows = load_result(name, results)["summary"]
    seeds = max(r["seeds"] for r in rows)
    panels = (("acc_pruned", "after the last pruning point"), ("acc", "after fine-tuning"))
    title = (
        f"Structured pruning during training, callback vs Torch-Pruning ({seeds} seeds, mean ± std)"
    )
    return [save(_structured_figure(rows, panels, title, "dense (start)"), out, name)]


def _structured_figure(
    rows: list[dict[str, Any]], panels: tuple[tuple[str, str], ...], title: str, dense: str
) -> Any:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(
        len(panels), len(configs), figsize=(4.6 * len(configs), 4.2 * len(panels)), squeeze=False
    )
    for column, config in enumerate(configs):
        cells = [r for r in rows if r["config"] == config]
        methods = list(dict.fromkeys(r["method"] for r in cells))
        for row, (key, subtitle) in enumerate(panels):
            ax = axes[row][column]
            for method in methods:
                points = sorted(
                    (r["param_fraction"], r[key], r[f"{key}_std"])
                    for r in cells
                    if r["method"] == method
                )
                x, y, err = zip(*points, strict=True)
                ax.errorbar(x, y, yerr=err, capsize=2, label=method,
                            **{"linewidth": 1.6, "markersize": 6,
                               **STRUCTURED_STYLE.get(method, {})})  # fmt: skip
            ax.axhline(cells[0]["dense_acc"], color="k", linestyle=":", linewidth=1,
                       label=dense)  # fmt: skip
            ax.set_xlabel("fraction of parameters kept")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{config} ({cells[0]['params_dense'] / 1e3:.0f} k), {subtitle}")
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# Driver --------------------------------------------------------------------------------------

PlotFn = Callable[[Path, Path], list[Path]]
# (figure function, result files it needs: a missing one skips the figure)
PLOTS: list[tuple[PlotFn, tuple[str, ...]]] = [
    (plot_oneshot, ()),  # checks its two files itself
    (plot_estimator_cost, ("estimator_cost",)),
    (plot_curvature_cost, ("curvature_cost",)),
    (plot_training_overhead, ("training_overhead",)),
    (plot_aux_convergence, ("aux_convergence",)),
    (plot_time_to_quality, ("time_to_quality",)),
    (plot_sparsity_schedule, ()),
    (plot_gradual, ()),
    (plot_robustness, ("robustness",)),
    (plot_transformer, ("transformer",)),
    (plot_pretrained, ("pretrained",)),
    (plot_structured, ("structured",)),
    (plot_structured_gradual, ("structured_gradual",)),
]


def make_report(results: Path = RESULTS_DIR, out: Path = PLOTS_DIR) -> list[Path]:
    """Write every figure whose result files exist; return the paths written."""
    written: list[Path] = []
    for plot, needs in PLOTS:
        missing = [n for n in needs if not (results / f"{n}.json").exists()]
        if missing:
            print(
                f"report: {', '.join(m + '.json' for m in missing)} not found in {results}; "
                f"{plot.__name__} skipped"
            )
            continue
        written += plot(results, out)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="result JSON folder")
    parser.add_argument("--out", type=Path, default=PLOTS_DIR, help="folder for the PNGs")
    args = parser.parse_args(argv)
    for path in make_report(args.results, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
