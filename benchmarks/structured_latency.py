"""Does a compacted model's CPU latency follow its FLOPs? Latency ratios at growing batch sizes.

:mod:`benchmarks.structured` times its compacted models at batch 1 and 64, where these small
models (72–267 k parameters) spend much of a call on per-layer overhead that FLOPs do not count
(Python dispatch, pooling, activations, norms, reshapes). This benchmark rebuilds the same
models (seed 0, the same training), prunes them one-shot with ``fls`` at 30/50/70% of their
units (:func:`~lightning_fls.prune_one_shot`, then :func:`~lightning_fls.compact`), and times
dense and compacted models at batch sizes 1 to ``--batches`` (one thread, ``no_grad``, eval,
calls interleaved, median of ``--repeats``), beside the FLOP ratio counted by
``torch.utils.flop_counter``::

    .venv/bin/python -m benchmarks.structured_latency           # about 10 minutes
    .venv/bin/python -m benchmarks.structured_latency --quick   # smoke run

Results go to ``docs/results/structured_latency.json`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, write_json
from benchmarks.structured import (
    CONFIGS,
    build,
    check_ratios,
    count,
    flops,
    latency,
    markdown_table,
    train,
)
from lightning_fls import compact, prune_one_shot
from lightning_fls.datasets import load_fashion_mnist


def run(args: argparse.Namespace) -> Path:
    name = "structured_latency" + ("_quick" if args.quick else "")
    out = RESULTS_DIR if args.out is None else Path(args.out)
    train_x, train_y = load_fashion_mnist("train", args.data_dir)
    train_x, train_y = train_x[: args.train_size], train_y[: args.train_size]
    rows: list[dict[str, Any]] = []
    kinds = list(dict.fromkeys(CONFIGS[c][0] for c in args.configs))
    for kind in kinds:
        torch.manual_seed(0)
        dense: Any = build(kind)
        train(dense, train_x, train_y, args.epochs, 0)
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        calib_x, calib_y = train_x[pick[: args.calibration]], train_y[pick[: args.calibration]]
        calibration = [
            (calib_x[i : i + 128], calib_y[i : i + 128]) for i in range(0, len(calib_x), 128)
        ]
        one = train_x[:1]
        for config in (c for c in args.configs if CONFIGS[c][0] == kind):
            for ratio in args.ratios:
                model = copy.deepcopy(dense).eval()
                prune_one_shot(model, calibration, model.loss, sparsity=ratio, method="fls",
                               granularity=CONFIGS[config][1], steps=args.steps,
                               samples_per_step=args.calibration, progress=False)  # fmt: skip
                small = compact(model, one).eval()
                row: dict[str, Any] = {
                    "config": config, "ratio": ratio,
                    "param_fraction": count(small) / count(dense),
                    "flops_ratio": flops(small, one) / flops(dense, one), "latency": {},
                }  # fmt: skip
                for size in args.batches:
                    timing = latency(dense, small, train_x[:size], args.repeats)
                    row["latency"][str(size)] = {
                        "dense_ms": 1e3 * timing["dense"],
                        "pruned_ms": 1e3 * timing["pruned"],
                        "ratio": timing["pruned"] / timing["dense"],
                    }
                rows.append(row)
                print(
                    f"{config:17s} {ratio:.1f}: FLOPs {row['flops_ratio']:.2f}, latency "
                    + ", ".join(f"b{b} {v['ratio']:.2f}" for b, v in row["latency"].items()),
                    flush=True,
                )
    path = write_json(name, {
        "command": "python -m benchmarks.structured_latency " + " ".join(sys.argv[1:]),
        "protocol": {
            "models": "as benchmarks.structured, seed 0", "train_images": len(train_x),
            "epochs": args.epochs, "method": "fls one-shot, then compact",
            "fls_steps": args.steps, "calibration_images": args.calibration,
            "latency": f"median of {args.repeats} interleaved calls, torch.set_num_threads(1), "
            "no_grad, eval",
        },
        "rows": rows,
    }, out=out / f"{name}.json")  # fmt: skip
    print(markdown(rows))
    return path


def markdown(rows: list[dict[str, Any]]) -> str:
    sizes = list(rows[0]["latency"]) if rows else []
    header = ["config", "units removed", "params kept", "FLOP ratio",
              *(f"latency ratio b{s}" for s in sizes)]  # fmt: skip
    return markdown_table(header, [[
        r["config"], f"{r['ratio']:.0%}", f"{r['param_fraction']:.2f}", f"{r['flops_ratio']:.2f}",
        *(f"{r['latency'][s]['ratio']:.2f}" for s in sizes),
    ] for r in rows])  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 64 256 1024")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="fls recomputation steps")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--data-dir", default=None, help="default: the Debian package")
    parser.add_argument("--out", default=None, help="directory (default docs/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.epochs, args.calibration = min(args.train_size, 600), 1, 128
        args.steps, args.repeats = 2, 3
        args.batches = args.batches or [1, 64]
    args.batches = args.batches or [1, 64, 256, 1024]
    if any(b < 1 for b in args.batches) or max(args.batches) > args.train_size:
        parser.error(f"--batches must lie in [1, --train-size], got {args.batches}")
    check_ratios(parser, args.ratios)
    return run(args)


if __name__ == "__main__":
    main()
