"""Structured pruning benchmark: whole units removed one-shot, against Torch-Pruning.

Three Fashion-MNIST classifiers are trained once per seed (``--epochs`` of Adam, batch 100, on
the first ``--train-size`` training images): :class:`~lightning_fls.models.ConvClassifier`
(its two convolutions lose output **channels**), :class:`~lightning_fls.models.MLPClassifier`
(784-300-100-10; its two hidden layers lose **neurons**) and
:class:`~lightning_fls.models.PatchTransformer` with ``attention="linear"`` (its blocks' MLPs
lose **neurons**, ``mlp.fc1`` → ``mlp.fc2``; separately, its :class:`SelfAttention` layers lose
whole **heads**). From each trained model, at 30/50/70% of the removable units, every method
prunes a copy once with the same calibration images (``--calibration`` training images drawn
per seed), and the pruned model is measured as it is (one-shot) and after ``--finetune-epochs``
of the same training (fine-tuned; the physically smaller model is trained, so removed units
stay removed).

The methods compared:

* ``fls``: :func:`~lightning_fls.prune_one_shot` with ``method="fls"`` and the granularity
  (group OBS cost, survivors corrected), then :func:`~lightning_fls.compact`;
* ``magnitude``: the same with ``method="magnitude"`` (group magnitude, no correction);
* ``tp_magnitude``, ``tp_taylor``, ``tp_hessian``: Torch-Pruning's ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2)``, ``GroupTaylorImportance()`` and
  ``GroupHessianImportance()`` (its defaults: mean over the group, mean-normalised),
  ``global_pruning=True``, on the layers ours prune (every other Linear layer is in
  ``ignored_layers``). Taylor reads the gradient of the mean loss over the calibration images;
  Hessian (OBD) the mean per-example squared gradient over them, written into ``.grad`` (its
  ``accumulate_grad`` in torch-pruning 1.6 keys by parameter but tests membership by name, so
  it would keep only the last example).

**Matching on parameter count.** Torch-Pruning's ``pruning_ratio`` is its own (a fraction of
channels, normalised importance ranked globally). For each cell its ratio is found by bisection
(``--search-steps`` halvings of ``[0, 1]``) so that its pruned model's parameter count is the
closest reached to that of our ``fls`` model (``--match``: another of ours), compacted, for the
same seed and unit fraction;
the counts reached are recorded (``params``), as is the ratio used (``tp_ratio``). Torch-Pruning
has no head run: its dependency graph finds no head groups in ``SelfAttention`` (separate
``q/k/v`` Linear layers around ``scaled_dot_product_attention``), so heads compare ours only.

**Latency**: the pruned model (ours compacted, Torch-Pruning's as pruned) in eval mode under
``torch.no_grad()``, with ``torch.set_num_threads(1)``, on batches of 1 and 64 images: the
median of ``--repeats`` calls, interleaved with calls of the dense model
(:func:`~benchmarks.common.time_interleaved`), and their ratio. **FLOPs** per image are counted
with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) at batch 1.

    .venv/bin/pip install torch-pruning      # the peer (1.6.1 measured; not a dependency)
    .venv/bin/python -m benchmarks.structured            # 3 seeds, about 30 min on 2 cores
    .venv/bin/python -m benchmarks.structured --quick    # smoke run, under a minute

Results go to ``docs/results/structured.json`` (``structured_quick.json`` with ``--quick``),
with a markdown table printed and the figure ``docs/results/plots/structured.png`` (accuracy
against the fraction of parameters kept).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RESULTS_DIR, time_interleaved, write_json
from lightning_fls import compact, prune_one_shot
from lightning_fls.datasets import load_fashion_mnist
from lightning_fls.models import ConvClassifier, MLPClassifier, PatchTransformer

CONFIGS: dict[str, tuple[str, str]] = {
    "cnn": ("cnn", "channel"),
    "mlp": ("mlp", "neuron"),
    "transformer": ("transformer", "neuron"),
    "transformer_heads": ("transformer", "head"),
}
"""Benchmark configuration → (trained model, granularity)."""

OURS = ("fls", "kfac", "magnitude")
PEERS = ("tp_magnitude", "tp_taylor", "tp_hessian")
METHODS = OURS + PEERS
RATIOS = (0.3, 0.5, 0.7)
BATCH = 100


def build(kind: str) -> nn.Module:
    if kind == "cnn":
        return ConvClassifier()
    if kind == "mlp":
        return MLPClassifier()
    return PatchTransformer(attention="linear")


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batches(x: Tensor, y: Tensor, size: int, generator: torch.Generator) -> Iterator[tuple]:
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), size):
        index = order[start : start + size]
        yield x[index], y[index]


def train(model: Any, x: Tensor, y: Tensor, epochs: int, seed: int) -> None:
    """Adam (the model's ``configure_optimizers``) on the model's loss, batch 100."""
    model.train()
    optimizer = model.configure_optimizers()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for inputs, targets in batches(x, y, BATCH, generator):
            optimizer.zero_grad()
            model.loss(model(inputs), targets).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum())
        for i in range(0, len(x), 1000)
    )
    return correct / len(x)


def flops(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def latency(dense: nn.Module, pruned: nn.Module, x: Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call of both models on ``x``, one thread, calls interleaved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return time_interleaved(
                {"dense": lambda: dense(x), "pruned": lambda: pruned(x)}, repeats=repeats
            )
    finally:
        torch.set_num_threads(threads)


def ignored_layers(model: nn.Module, granularity: str) -> list[nn.Module]:
    """Layers Torch-Pruning must not prune: all but those whose units ours remove."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if granularity == "channel":
        return linears  # only the convolutions lose channels
    if isinstance(model, PatchTransformer):
        fc1 = {id(block.mlp.fc1) for block in model.blocks}  # type: ignore[union-attr]
        return [m for m in linears if id(m) not in fc1]
    return linears[-1:]  # the MLP's hidden layers, not its output layer


def calibration_gradients(
    model: Any, x: Tensor, y: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Gradient of the mean loss, and mean per-example squared gradient, by parameter name."""
    params = dict(model.named_parameters())
    model.zero_grad()
    model.loss(model(x), y).backward()
    mean = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        model.zero_grad()
        model.loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in params.items():
            if p.grad is not None:
                squares[n] += p.grad.square()
    model.zero_grad()
    return mean, {n: s / len(x) for n, s in squares.items()}


def tp_prune_(
    model: nn.Module,
    method: str,
    ratio: float,
    granularity: str,
    grads: dict[str, Tensor] | None,
    example: Tensor,
) -> nn.Module:
    """``model`` itself pruned by Torch-Pruning's ``MetaPruner`` at its own ``ratio``."""
    import torch_pruning as tp

    if grads is not None:
        for name, param in model.named_parameters():
            param.grad = grads[name].clone() if name in grads else None
    importance = {
        "tp_magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "tp_taylor": lambda: tp.importance.GroupTaylorImportance(),
        "tp_hessian": lambda: tp.importance.GroupHessianImportance(),
    }[method]()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        global_pruning=True,
        pruning_ratio=ratio,
        ignored_layers=ignored_layers(model, granularity),
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def tp_matched(
    make: Callable[[float], nn.Module], target: int, steps: int
) -> tuple[nn.Module, float]:
    """The pruned model (and ratio) whose parameter count is closest to ``target``."""
    low, high = 0.0, 1.0
    best: tuple[int, float, nn.Module] | None = None
    for _ in range(steps):
        ratio = (low + high) / 2
        try:
            model = make(ratio)
        except Exception:  # an over-large ratio can empty a layer: treat as too much
            high = ratio
            continue
        params = count(model)
        if best is None or abs(params - target) < best[0]:
            best = (abs(params - target), ratio, model)
        if params > target:
            low = ratio
        else:
            high = ratio
    if best is None:
        raise RuntimeError("Torch-Pruning failed at every ratio tried.")
    return best[2], best[1]


def run(args: argparse.Namespace) -> Path:

    name = "structured" + ("_quick" if args.quick else "")
    out = RESULTS_DIR if args.out is None else Path(args.out)
    path = out / f"{name}.json"
    train_x, train_y = load_fashion_mnist("train", args.data_dir)
    test_x, test_y = load_fashion_mnist("test", args.data_dir)
    train_x, train_y = train_x[: args.train_size], train_y[: args.train_size]
    test_x, test_y = test_x[: args.test_size], test_y[: args.test_size]
    protocol = {
        "models": {
            "cnn": "ConvClassifier(channels=(8, 16), hidden=100)",
            "mlp": "MLPClassifier(784-300-100-10)",
            "transformer": "PatchTransformer(attention='linear', d=64, 4 heads, depth 2, mlp 128)",
        },
        "granularity": {c: g for c, (_, g) in CONFIGS.items()},
        "train_images": len(train_x),
        "test_images": len(test_x),
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "calibration_images": args.calibration,
        "fls_steps": args.steps,
        "fls_damping": args.damping,
        "samples_per_step": args.calibration,
        "tp_search_steps": args.search_steps,
        "latency": f"median of {args.repeats} calls, torch.set_num_threads(1), no_grad, eval",
        "torch_pruning": importlib.metadata.version("torch-pruning"),  # not __version__ (it lags)
        "matching": "Torch-Pruning's global pruning_ratio bisected to the parameter count of "
        f"our compacted {args.match} model (same seed and unit fraction)",
        "matched_to": args.match,
    }
    runs: list[dict[str, Any]] = []
    dense_runs: list[dict[str, Any]] = []
    one, batch = test_x[:1], test_x[:64]

    def save() -> None:
        payload = {
            "command": "python -m benchmarks.structured " + " ".join(sys.argv[1:]),
            "metric": "test_acc",
            "better": "higher",
            "protocol": protocol,
            "dense": dense_runs,
            "runs": runs,
            "summary": summarise(runs, dense_runs),
        }
        write_json(name, payload, out=path)

    kinds = list(dict.fromkeys(CONFIGS[c][0] for c in args.configs))
    for seed in range(args.seeds):
        for kind in kinds:
            torch.manual_seed(seed)
            dense: Any = build(kind)
            start = time.perf_counter()
            train(dense, train_x, train_y, args.epochs, seed)
            dense_acc = accuracy(dense, test_x, test_y)
            dense_runs.append({"model": kind, "seed": seed, "metric": dense_acc,
                               "params": count(dense), "flops": flops(dense, one),
                               "seconds": time.perf_counter() - start})  # fmt: skip
            print(f"[seed {seed}] {kind}: dense acc {dense_acc:.4f}", flush=True)
            pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
            calib_x = train_x[pick[: args.calibration]]
            calib_y = train_y[pick[: args.calibration]]
            calibration = [
                (calib_x[i : i + 128], calib_y[i : i + 128]) for i in range(0, len(calib_x), 128)
            ]
            taylor, hessian = calibration_gradients(dense, calib_x, calib_y)
            for config in (c for c in args.configs if CONFIGS[c][0] == kind):
                granularity = CONFIGS[config][1]
                for ratio in args.ratios:
                    target = None
                    for method in args.methods:
                        if method in PEERS and granularity == "head":
                            continue
                        start = time.perf_counter()
                        tp_ratio = None
                        if method in OURS:
                            model = copy.deepcopy(dense).eval()
                            prune_one_shot(model, calibration, model.loss, sparsity=ratio,
                                           method=method, granularity=granularity,
                                           steps=1 if method == "magnitude" else args.steps,
                                           **({"damping": args.damping}
                                              if args.damping and method != "magnitude" else {}),
                                           samples_per_step=args.calibration, seed=seed,
                                           progress=False)  # fmt: skip
                            small = compact(model, one)
                            if method == args.match:
                                target = count(small)
                        else:
                            grads = {"tp_taylor": taylor, "tp_hessian": hessian}.get(method)
                            assert target is not None  # main() puts --match before the peers
                            small, tp_ratio = tp_matched(
                                lambda r, m=method, g=granularity, d=grads, base=dense: tp_prune_(
                                    copy.deepcopy(base), m, r, g, d, one
                                ),
                                target,
                                args.search_steps,
                            )
                        seconds = time.perf_counter() - start
                        oneshot = accuracy(small, test_x, test_y)
                        timing = {
                            size: latency(dense, small, x, args.repeats)
                            for size, x in (("1", one), ("64", batch))
                        }
                        small_flops = flops(small, one)
                        train(small, train_x, train_y, args.finetune_epochs, seed)
                        finetuned = accuracy(small, test_x, test_y)
                        run_ = {
                            "config": config, "model": kind, "granularity": granularity,
                            "method": method, "ratio": ratio, "seed": seed,
                            "metric": oneshot, "metric_finetuned": finetuned,
                            "params": count(small), "params_dense": count(dense),
                            "tp_ratio": tp_ratio, "prune_seconds": seconds,
                            "flops": small_flops, "flops_dense": dense_runs[-1]["flops"],
                            "latency_b1": timing["1"]["pruned"],
                            "latency_b1_dense": timing["1"]["dense"],
                            "latency_b64": timing["64"]["pruned"],
                            "latency_b64_dense": timing["64"]["dense"],
                        }  # fmt: skip
                        runs.append(run_)
                        print(
                            f"[seed {seed}] {config:17s} {method:12s} {ratio:.1f}: acc "
                            f"{oneshot:.4f} → {finetuned:.4f} fine-tuned, params "
                            f"{run_['params']}/{run_['params_dense']}, {seconds:.1f} s",
                            flush=True,
                        )
            save()
    save()
    print(markdown(summarise(runs, dense_runs)))
    from benchmarks.report import plot_structured

    plots = out / "plots"
    for figure in plot_structured(out, plots, name=name):
        print(f"wrote {figure}")
    return path


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cells_of(runs: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    """Runs grouped by (config, method, ratio), in first-seen order."""
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["config"], r["method"], r["ratio"]), []).append(r)
    return cells


def summarise(runs: list[dict[str, Any]], dense: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, method, ratio): means and standard deviations over the seeds."""
    rows = []
    for (config, method, ratio), group in cells_of(runs).items():
        acc, acc_std = mean_std([r["metric"] for r in group])
        tuned, tuned_std = mean_std([r["metric_finetuned"] for r in group])
        model = group[0]["model"]
        dense_acc = [d["metric"] for d in dense if d["model"] == model]
        rows.append({
            "config": config, "method": method, "ratio": ratio, "seeds": len(group),
            "acc": acc, "acc_std": acc_std, "acc_finetuned": tuned,
            "acc_finetuned_std": tuned_std, "dense_acc": statistics.fmean(dense_acc),
            "params": statistics.fmean(r["params"] for r in group),
            "params_dense": group[0]["params_dense"],
            "param_fraction": statistics.fmean(r["params"] / r["params_dense"] for r in group),
            "flops_ratio": statistics.fmean(r["flops"] / r["flops_dense"] for r in group),
            "latency_b1_ms": 1e3 * statistics.median(r["latency_b1"] for r in group),
            "latency_b1_ratio": statistics.median(
                r["latency_b1"] / r["latency_b1_dense"] for r in group),
            "latency_b64_ms": 1e3 * statistics.median(r["latency_b64"] for r in group),
            "latency_b64_ratio": statistics.median(
                r["latency_b64"] / r["latency_b64_dense"] for r in group),
        })  # fmt: skip
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["config", "method", "units removed", "acc one-shot", "acc fine-tuned",
              "params (frac)", "FLOP ratio", "latency b1 ms (ratio)",
              "latency b64 ms (ratio)"]  # fmt: skip
    return markdown_table(header, [[
        r["config"], r["method"], f"{r['ratio']:.0%}",
        f"{r['acc']:.4f} ± {r['acc_std']:.4f}",
        f"{r['acc_finetuned']:.4f} ± {r['acc_finetuned_std']:.4f}",
        f"{r['params']:.0f} ({r['param_fraction']:.3f})", f"{r['flops_ratio']:.3f}",
        f"{r['latency_b1_ms']:.3f} ({r['latency_b1_ratio']:.2f})",
        f"{r['latency_b64_ms']:.3f} ({r['latency_b64_ratio']:.2f})",
    ] for r in rows])  # fmt: skip


def check_ratios(parser: argparse.ArgumentParser, ratios: list[float]) -> None:
    """Refuse unit fractions outside ``(0, 1)`` with the parser's usage error."""
    if not all(0.0 < r < 1.0 for r in ratios):
        parser.error(f"--ratios must be in (0, 1), got {ratios}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--calibration", type=int, default=1024, help="calibration images")
    parser.add_argument("--steps", type=int, default=16, help="fls recomputation steps")
    parser.add_argument("--damping", type=float, default=None, help="fls relative damping")
    parser.add_argument("--match", choices=OURS, default="fls",
                        help="Torch-Pruning matches this method's parameter count")  # fmt: skip
    parser.add_argument("--search-steps", type=int, default=12, help="Torch-Pruning bisection")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per latency")
    parser.add_argument("--data-dir", default=None, help="default: the Debian package")
    parser.add_argument("--out", default=None, help="directory (default docs/results)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, 600 images, 1+1 epochs, 128 calibration images, 2 fls steps",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = 1
        args.train_size = min(args.train_size, 600)
        args.test_size = min(args.test_size, 500)
        args.epochs = args.finetune_epochs = 1
        args.calibration, args.steps, args.search_steps, args.repeats = 128, 2, 6, 3
    check_ratios(parser, args.ratios)
    peers = [i for i, m in enumerate(args.methods) if m in PEERS]
    if peers and (args.match not in args.methods or args.methods.index(args.match) > peers[0]):
        parser.error(f"--methods must list --match ({args.match}) before the Torch-Pruning ones")
    return run(args)


if __name__ == "__main__":
    main()
