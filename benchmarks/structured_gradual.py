"""Gradual structured pruning with fine-tuning: the callback against Torch-Pruning's iterations.

The one-shot comparison lives in :mod:`benchmarks.structured`; this one prunes while training.
From each dense model of that benchmark (same models, seeds, ``--epochs`` of Adam on the same
images), training goes on for ``--prune-epochs`` + ``--finetune-epochs`` more epochs, the same
for every method:

* ``fls`` (or ``kfac``): a Lightning ``Trainer`` with
  ``FLSPruningCallback(method=..., granularity=..., target_sparsity=ratio, start_epoch=0,
  end_epoch=prune_epochs, compact_on_train_end=True)`` and otherwise its defaults (cubic
  schedule, gradients recorded on every 10th batch, 1024 samples per estimate): units are
  removed at the end of each of the first ``--prune-epochs`` epochs (the cubic schedule reaching
  the ratio at the last), then the model trains on; the trained module is compacted in place.
* ``tp_magnitude``, ``tp_taylor``, ``tp_hessian``: the same Trainer, data order and epochs,
  with a callback running Torch-Pruning's ``MetaPruner`` at the same epoch ends on the module
  itself (its importances as in :mod:`benchmarks.structured`, Taylor and Hessian from the
  current model's gradients on the ``--calibration`` images). At each pruning point its ratio
  is bisected to the parameter count that the compacted model of the first method of ours in
  ``--methods`` had at that point (same seed, config and ratio), so both follow one size
  trajectory.
  Adam is rebuilt after each of its pruning points (the parameters changed shape); ``fls``
  keeps its Adam state (masked weights stay at zero). Where a coarse bisection step left it
  already below the next point's size, it skips that point.

Reported per cell: test accuracy right after the last pruning point (``acc_pruned``) and at the
end (``acc``), parameter counts, seconds. Heads are left out (Torch-Pruning finds no head groups
in our attention). ::

    .venv/bin/python -m benchmarks.structured_gradual           # 3 seeds
    .venv/bin/python -m benchmarks.structured_gradual --quick   # smoke run

Results go to ``docs/results/structured_gradual.json`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import RESULTS_DIR, trainer, write_json
from benchmarks.structured import (
    BATCH,
    CONFIGS,
    PEERS,
    accuracy,
    build,
    calibration_gradients,
    cells_of,
    check_ratios,
    count,
    markdown_table,
    mean_std,
    tp_matched,
    tp_prune_,
    train,
)
from lightning_fls import FLSPruningCallback, compact
from lightning_fls.datasets import load_fashion_mnist

OURS = ("fls", "kfac")
METHODS = (*OURS, *PEERS)
DEFAULT_METHODS = ("fls", *PEERS)
GRADUAL_CONFIGS = ("cnn", "mlp", "transformer")


class _Trajectory(pl.Callback):
    """After each pruning point of ``pruning``: the compacted parameter count and test accuracy."""

    def __init__(self, pruning: FLSPruningCallback, kind: str, example: Tensor,
                 test: tuple[Tensor, Tensor]) -> None:  # fmt: skip
        self.pruning, self.kind, self.example, self.test = pruning, kind, example, test
        self.params: list[int] = []
        self.accuracy: list[float] = []
        self.epochs: list[int] = []  # the epochs whose end removed units

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.pruning.history) == len(self.params):
            return  # nothing removed this epoch (none due, or the rounded target reached)
        self.epochs.append(trainer.current_epoch)
        fresh = build(self.kind)
        fresh.load_state_dict(pl_module.state_dict())
        self.params.append(count(compact(fresh.eval(), self.example)))
        self.accuracy.append(accuracy(pl_module, *self.test))
        pl_module.train()


class _TorchPruningPoints(pl.Callback):
    """Torch-Pruning at the end of each epoch in ``targets``, in place.

    Its ratio is bisected on copies so that the pruned model has ``targets[epoch]`` parameters;
    then the module itself is pruned at that ratio and the optimizer rebuilt on its new
    parameters (Adam restarts: the shapes changed).
    """

    def __init__(self, method: str, granularity: str, targets: dict[int, int],
                 calibration: tuple[Tensor, Tensor], search_steps: int,
                 test: tuple[Tensor, Tensor]) -> None:  # fmt: skip
        self.method, self.granularity, self.targets = method, granularity, targets
        self.calibration, self.search_steps, self.test = calibration, search_steps, test
        self.params: list[int] = []
        self.accuracy: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch not in self.targets:
            return
        if count(pl_module) > self.targets[epoch]:  # an earlier point may have overshot
            self._prune(trainer, pl_module, self.targets[epoch])
        self.params.append(count(pl_module))
        self.accuracy.append(accuracy(pl_module, *self.test))
        pl_module.train()

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: int) -> None:
        grads = None
        if self.method != "tp_magnitude":
            taylor, hessian = calibration_gradients(pl_module.eval(), *self.calibration)
            grads = taylor if self.method == "tp_taylor" else hessian
        example = self.test[0][:1]
        attached, pl_module._trainer = pl_module._trainer, None  # copies leave the Trainer out
        try:
            _, ratio = tp_matched(
                lambda r: tp_prune_(
                    copy.deepcopy(pl_module), self.method, r, self.granularity, grads, example
                ),
                target,
                self.search_steps,
            )
            tp_prune_(pl_module, self.method, ratio, self.granularity, grads, example)
        finally:
            pl_module._trainer = attached
        trainer.strategy.optimizers = [pl_module.configure_optimizers()]


def gradual(
    dense: nn.Module, pruning: pl.Callback, args: argparse.Namespace,
    data: tuple[Tensor, Tensor], seed: int, record: pl.Callback | None = None,
) -> nn.Module:  # fmt: skip
    """``--prune-epochs`` + ``--finetune-epochs`` of Adam (the model's own) with ``pruning``."""
    model = copy.deepcopy(dense).train()
    loader = DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    callbacks = [pruning] if record is None else [pruning, record]
    trainer(args.prune_epochs + args.finetune_epochs, callbacks).fit(model, loader)
    return model.eval()


def run(args: argparse.Namespace) -> Path:

    name = "structured_gradual" + ("_quick" if args.quick else "")
    out = RESULTS_DIR if args.out is None else Path(args.out)
    path = out / f"{name}.json"
    train_x, train_y = load_fashion_mnist("train", args.data_dir)
    test_x, test_y = load_fashion_mnist("test", args.data_dir)
    data = (train_x[: args.train_size], train_y[: args.train_size])
    test = (test_x[: args.test_size], test_y[: args.test_size])
    protocol = {
        "train_images": len(data[0]),
        "test_images": len(test[0]),
        "dense_epochs": args.epochs,
        "prune_epochs": args.prune_epochs,
        "finetune_epochs": args.finetune_epochs,
        "calibration_images": args.calibration,
        "fls": "FLSPruningCallback(granularity, target_sparsity=ratio, start_epoch=0, "
        "end_epoch=prune_epochs, compact_on_train_end=True), other arguments default",
        "tp_search_steps": args.search_steps,
        "torch_pruning": importlib.metadata.version("torch-pruning"),  # not __version__ (it lags)
        "matching": "at each pruning point, Torch-Pruning's pruning_ratio on the current model "
        "bisected to the parameter count of the first of our methods (compacted) at that point",
    }
    runs: list[dict[str, Any]] = []

    def save() -> None:
        write_json(name, {
            "command": "python -m benchmarks.structured_gradual " + " ".join(sys.argv[1:]),
            "metric": "test_acc", "better": "higher", "protocol": protocol, "runs": runs,
            "summary": summarise(runs),
        }, out=path)  # fmt: skip

    kinds = list(dict.fromkeys(CONFIGS[c][0] for c in args.configs))
    for seed in range(args.seeds):
        for kind in kinds:
            torch.manual_seed(seed)
            dense: Any = build(kind)
            train(dense, *data, args.epochs, seed)
            dense_acc = accuracy(dense, *test)
            print(f"[seed {seed}] {kind}: dense acc {dense_acc:.4f}", flush=True)
            pick = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(seed))
            calibration = (data[0][pick[: args.calibration]], data[1][pick[: args.calibration]])
            for config in (c for c in args.configs if CONFIGS[c][0] == kind):
                granularity = CONFIGS[config][1]
                for ratio in args.ratios:
                    targets: dict[int, int] = {}
                    for method in args.methods:
                        start = time.perf_counter()
                        if method in OURS:
                            ours = FLSPruningCallback(
                                method=method, granularity=granularity, target_sparsity=ratio,
                                start_epoch=0, end_epoch=args.prune_epochs,
                                compact_on_train_end=True, seed=seed, verbose=False,
                            )  # fmt: skip
                            points: Any = _Trajectory(ours, kind, test[0][:1], test)
                            model = gradual(dense, ours, args, data, seed, record=points)
                            if not targets:  # the peers follow the first of ours
                                targets = dict(zip(points.epochs, points.params, strict=True))
                        else:
                            points = _TorchPruningPoints(
                                method, granularity, targets, calibration, args.search_steps, test
                            )
                            model = gradual(dense, points, args, data, seed)
                        params, accs = points.params, points.accuracy
                        seconds = time.perf_counter() - start
                        final = accuracy(model, *test)
                        runs.append({
                            "config": config, "model": kind, "granularity": granularity,
                            "method": method, "ratio": ratio, "seed": seed,
                            "metric": final, "acc_pruned": accs[-1], "acc_points": accs,
                            "params": count(model), "params_points": params,
                            "params_dense": count(dense), "dense_acc": dense_acc,
                            "seconds": seconds,
                        })  # fmt: skip
                        print(
                            f"[seed {seed}] {config:12s} {method:12s} {ratio:.1f}: acc "
                            f"{accs[-1]:.4f} after pruning → {final:.4f}, params "
                            f"{count(model)}/{count(dense)} {params}, {seconds:.1f} s",
                            flush=True,
                        )
            save()
    save()
    print(markdown(summarise(runs)))
    from benchmarks.report import plot_structured_gradual

    for figure in plot_structured_gradual(out, out / "plots", name=name):
        print(f"wrote {figure}")
    return path


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, method, ratio): means and standard deviations over the seeds."""
    rows = []
    for (config, method, ratio), group in cells_of(runs).items():
        acc, acc_std = mean_std([r["metric"] for r in group])
        pruned, pruned_std = mean_std([r["acc_pruned"] for r in group])
        rows.append({
            "config": config, "method": method, "ratio": ratio, "seeds": len(group),
            "acc": acc, "acc_std": acc_std, "acc_pruned": pruned, "acc_pruned_std": pruned_std,
            "dense_acc": statistics.fmean(r["dense_acc"] for r in group),
            "params_dense": group[0]["params_dense"],
            "param_fraction": statistics.fmean(r["params"] / r["params_dense"] for r in group),
            "seconds": statistics.fmean(r["seconds"] for r in group),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["config", "method", "units removed", "acc after last prune", "acc at end",
              "params kept", "seconds"]  # fmt: skip
    return markdown_table(header, [[
        r["config"], r["method"], f"{r['ratio']:.0%}",
        f"{r['acc_pruned']:.4f} ± {r['acc_pruned_std']:.4f}",
        f"{r['acc']:.4f} ± {r['acc_std']:.4f}",
        f"{r['param_fraction']:.3f}", f"{r['seconds']:.0f}",
    ] for r in rows])  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=GRADUAL_CONFIGS,
                        default=list(GRADUAL_CONFIGS))  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1")
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    parser.add_argument("--prune-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--calibration", type=int, default=1024, help="Torch-Pruning gradients")
    parser.add_argument("--search-steps", type=int, default=12, help="Torch-Pruning bisection")
    parser.add_argument("--data-dir", default=None, help="default: the Debian package")
    parser.add_argument("--out", default=None, help="directory (default docs/results)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 600 images, 1+2+1 epochs, 128 calibration "
                        "images")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.prune_epochs, args.finetune_epochs = 1, 1, 2, 1
        args.train_size = min(args.train_size, 600)
        args.test_size = min(args.test_size, 500)
        args.calibration, args.search_steps = 128, 6
    if args.methods[0] not in OURS:
        parser.error(f"--methods must start with one of {OURS}: the peers follow its sizes")
    check_ratios(parser, args.ratios)
    return run(args)


if __name__ == "__main__":
    main()
