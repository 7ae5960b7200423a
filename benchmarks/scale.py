"""FLS at growing model size: peak memory against the largest layer, and where the time goes.

Randomly initialised BERT encoders (``transformers.BertConfig``, nothing downloaded) of growing
depth and width, up to BERT-base (12 layers, 768 wide, 85 M weights in its 72 Linear layers),
pruned one-shot to 50% by ``prune_one_shot`` with FLS's block-diagonal Q
(``FLS(structure=StructurePolicy("block_diagonal"))``, the ``fls`` default until 2026-12, whose
``n·B`` statistics are what the memory goal is stated in) in one step over the calibration
sequences (layer groups within ``memory_budget_mb``, by default its default), on random token
sequences, the true Fisher of a unit Gaussian on the mean-pooled embedding. Each size runs in
its own process, so that its peak resident memory is its own. Per size:

* ``peak_beyond_mb``: peak RSS minus the RSS after the model, the data and one warm-up forward
  and backward of one batch (the model and one batch of activations), against the largest
  layer's block-diagonal Q in float32 (``⌈n/50⌉·50²·4`` bytes): the goal is at most 2×;
* ``statistics_seconds`` (streamed block sums), ``factorisation_seconds`` (``(F_j + γI)⁻¹``
  per 50-block) and ``pass_seconds`` (one plain forward and backward over the calibration
  batches), and the ratio of the first two together to the third; in ``G`` layer groups the
  pruning runs ``2G − 1`` such passes (``calibration_passes``), each producing the gradients of
  one group's statistics, so the ratio to all of them is reported too, and so is the ratio of
  every layer's first statistics and factorisation alone to one pass
  (``statistics_and_factorisation_once_over_pass``: what building the estimate costs whatever
  the grouping);
* their achieved GFLOP/s (statistics: ``2·n·B`` per example for the block outer products plus
  ``2·T·d_out·d_in`` to form each example's gradient; factorisation: ``B³/3`` for the
  Cholesky factor and ``B³/3`` for its triangular inverse, per block), beside dense
  ``2048 × 2048`` matmuls' GFLOP/s in float32 and float64 measured in the same process.

``--structure kronecker`` measures the ``fls`` default instead, a Kronecker Q with the joint OBS
update in each row: its statistics are ``Σ a aᵀ`` and ``Σ g gᵀ`` over the kept tokens
(``2·s·(d_in'² + d_out²)`` per example, ``s = ⌈token_fraction·T⌉``; ``--token-fraction`` sets
it, default ``fls``'s 0.5), its factorisation the Cholesky factor and triangular
inverse of both factors (``2·(d_in'³ + d_out³)/3`` per layer); the memory is still compared
with the largest layer's block-diagonal Q, the goal's yardstick. Its statistics' products run in
bfloat16 where the CPU multiplies bfloat16 natively (``statistics_products``), and a bfloat16
matmul's GFLOP/s is then reported beside the others. ``--sequences`` sets the calibration size
(default 32 sequences of 32 tokens): the factorisation is a fixed cost per layer, the pass and
the statistics grow with the tokens.

    pip install -e '.[hf]'
    python -m benchmarks.scale                  # -> docs/results/scale.json
    python -m benchmarks.scale --sizes tiny     # one size only
    python -m benchmarks.scale --structure kronecker --out docs/results/scale_kronecker.json
    python -m benchmarks.scale --structure kronecker --sizes width-512 --sequences 512 \
        --out docs/results/scale_kronecker_512_sequences.json
    python -m benchmarks.scale --sizes tiny depth-4 depth-8 width-384 --budget largest \
        --out docs/results/scale_largest_budget.json   # layer groups of one layer's Q
    python -m benchmarks.scale --sizes tiny depth-4 depth-8 width-384 --budget largest \
        --live-memory --out docs/results/scale_largest_budget_live.json

``--live-memory`` runs each size with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then maps every
allocation above 64 KB on its own and returns it when freed, so the peak RSS is the peak of the
memory in use. By default glibc keeps freed heap memory for reuse, and the peak RSS also holds
what it kept, which moves by ±0.5× the largest Q from one run to the next. The times of a
``--live-memory`` run are not comparable: every large temporary is a fresh mapping (about 2×).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

SIZES: dict[str, tuple[int, int]] = {  # name: (layers, hidden); intermediate 4×, heads hidden/64
    "tiny": (2, 256),
    "depth-4": (4, 256),
    "depth-8": (8, 256),
    "width-384": (4, 384),
    "width-512": (4, 512),
    "bert-base": (12, 768),
}
SEQUENCES = 32
TOKENS = 32
BATCH = 8
BLOCK = 50
ALLOCATOR_ENV = "MALLOC_MMAP_THRESHOLD_"
STRUCTURE_NAMES = {
    "block_diagonal": "block-diagonal Q (B = 50)",
    "kronecker": "Kronecker Q (the default; joint OBS in rows)",
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _matmul_gflops(dtype: Any, size: int = 2048, repeats: int = 5) -> float:
    import torch

    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def run_one(
    name: str,
    budget: str = "default",
    seed: int = 0,
    structure: str = "block_diagonal",
    sequences: int = SEQUENCES,
    token_fraction: float | None = None,
) -> dict[str, Any]:
    """Prune one size in this process; its figures.

    Args:
        name: A key of :data:`SIZES`.
        budget: ``memory_budget_mb``: ``"default"``, ``"largest"`` (the largest layer's Q)
            or a number of MB.
        seed: Random seed.
        structure: FLS's Q: ``"block_diagonal"`` (B = 50) or ``"kronecker"`` (the default).
        sequences: Calibration sequences of :data:`TOKENS` tokens (one step over all).
        token_fraction: FLS's ``token_fraction`` (None: its default).
    """
    import torch
    from torch import Tensor, nn
    from transformers import BertConfig, BertModel

    from lightning_fls import StructurePolicy, prune_one_shot
    from lightning_fls._linalg import native_bfloat16_products
    from lightning_fls.fishleg.registry import block_class
    from lightning_fls.fishleg.statistics import StatisticsAccumulator
    from lightning_fls.layers import prunable_layers
    from lightning_fls.layers.gradients import kept_positions
    from lightning_fls.methods import FLS
    from lightning_fls.methods._fishleg import FishLegMethod, LayerStatisticsStream

    layers_count, hidden = SIZES[name]
    torch.manual_seed(seed)
    config = BertConfig(
        num_hidden_layers=layers_count,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=hidden // 64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=False)

        def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Any) -> Tensor:
            hidden_states = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return hidden_states.last_hidden_state.mean(1)

    model = Encoder().eval()
    ids = torch.randint(1000, config.vocab_size, (sequences, TOKENS))
    batches = [{"input_ids": ids[i : i + BATCH], "attention_mask": torch.ones(BATCH, TOKENS,
                dtype=torch.long)} for i in range(0, sequences, BATCH)]  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            batch["dense"] = model(**batch)

    def loss_fn(outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return 0.5 * (outputs - batch["dense"]).square().sum(-1).mean()

    layers = prunable_layers(model)
    shapes = {key: a.canonical_shape for key, a in layers.items()}
    weights = sum(d_out * d_in for d_out, d_in in shapes.values())
    largest_q = max(-(-d_out * d_in // BLOCK) * BLOCK**2 * 4 for d_out, d_in in shapes.values())

    start = time.perf_counter()  # one plain forward and backward over the calibration batches
    for batch in batches:
        loss_fn(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                batch).backward()  # fmt: skip
    pass_seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    baseline_mb = _rss_mb()

    timers = {"statistics": 0.0, "factorisation": 0.0, "statistics_once": 0.0,
              "factorisation_once": 0.0}  # fmt: skip
    # A layer's statistics gathered (and factorised) again in a later pass: its accumulator
    # and its LayerStatistics, so that every layer's first estimate is timed apart.
    seen: set[str] = set()
    popped: set[str] = set()
    repeated: set[int] = set()  # their ids, each dropped when its object dies

    def mark(obj: Any) -> None:
        repeated.add(id(obj))
        weakref.finalize(obj, repeated.discard, id(obj))

    new_stream, pop = FishLegMethod._new_stream, LayerStatisticsStream.pop

    def tracked_stream(self: Any, engine: Any, keys: Any = None) -> Any:
        stream = new_stream(self, engine, keys)
        for key, accumulator in stream.accumulators.items():
            if key in seen:
                mark(accumulator)
            seen.add(key)
        return stream

    def tracked_pop(self: Any, key: str) -> Any:
        statistics = pop(self, key)
        if key in popped:
            mark(statistics)
        popped.add(key)
        return statistics

    flops = {"statistics": 0.0, "factorisation": 0.0}
    timed_class = block_class(structure)  # type: ignore[arg-type]
    products: set[str] = set()  # the dtypes the Kronecker statistics' products ran in
    update, init = StatisticsAccumulator.update, timed_class.init_from_statistics
    result = StatisticsAccumulator.result

    def charge(kind: str, owner: Any, start: float) -> None:  # and to "_once" on a first pass
        elapsed = time.perf_counter() - start
        timers[kind] += elapsed
        if id(owner) not in repeated:
            timers[kind + "_once"] += elapsed

    def timed_update(self: Any, grads: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        update(self, grads, **kwargs)
        charge("statistics", self, start)
        d_out, d_in = grads.shape
        tokens = grads.inputs.shape[1]
        if structure == "kronecker":  # Σ a aᵀ and Σ g gᵀ over the kept tokens
            kept = kept_positions(tokens, self.token_fraction)
            flops["statistics"] += grads.batch_size * kept * 2 * (d_in**2 + d_out**2)
            low = self.takes_reduced_products(grads)
            products.add(str(self.product_dtype).removeprefix("torch.") if low else "float32")
        else:  # each example's gradient, then its blocks' outer products
            n = d_out * d_in
            flops["statistics"] += grads.batch_size * (2 * n * BLOCK + 2 * tokens * n)

    def timed_result(self: Any, **kwargs: Any) -> Any:  # the products of the last rows waiting
        start = time.perf_counter()
        statistics = result(self, **kwargs)
        charge("statistics", self, start)
        return statistics

    def timed_init(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        init(self, *args, **kwargs)
        charge("factorisation", args[0], start)  # once: by its LayerStatistics
        if structure == "kronecker":  # Cholesky and triangular inverse of both factors
            flops["factorisation"] += 2 * (self.shape[0] ** 3 + self.shape[1] ** 3) / 3
        else:
            flops["factorisation"] += self.num_blocks * 2 * BLOCK**3 / 3

    StatisticsAccumulator.update = timed_update  # type: ignore[method-assign]
    StatisticsAccumulator.result = timed_result  # type: ignore[method-assign]
    FishLegMethod._new_stream = tracked_stream  # type: ignore[method-assign]
    LayerStatisticsStream.pop = tracked_pop  # type: ignore[method-assign]
    timed_class.init_from_statistics = timed_init  # type: ignore[method-assign]
    start = time.perf_counter()
    budget_mb = {"default": None, "largest": largest_q / 2**20}.get(budget)
    if budget not in ("default", "largest"):
        budget_mb = float(budget)
    fraction = {} if token_fraction is None else {"token_fraction": token_fraction}
    method = FLS(structure=StructurePolicy(structure), **fraction)  # type: ignore[arg-type]
    report = prune_one_shot(model, batches, loss_fn, sparsity=0.5, steps=1, method=method,
                            memory_budget_mb=budget_mb,
                            samples_per_step=sequences, fisher="sampled", likelihood="gaussian",
                            seed=seed, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    peak_mb = _rss_mb()
    groups = report.layer_groups
    passes = 2 * groups - 1  # each layer group's statistics, then all but the last one's again
    return {
        "size": name,
        "structure": structure,
        "layers": layers_count,
        "hidden": hidden,
        "pruned_weights": weights,
        "linear_layers": len(shapes),
        "largest_layer_q_mb": largest_q / 2**20,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": peak_mb,
        "peak_beyond_mb": peak_mb - baseline_mb,
        "peak_beyond_over_largest_q": (peak_mb - baseline_mb) * 2**20 / largest_q,
        "memory_budget": budget,
        "layer_groups": groups,
        "calibration_passes": passes,
        "seconds": seconds,
        "pass_seconds": pass_seconds,
        "statistics_seconds": timers["statistics"],
        "factorisation_seconds": timers["factorisation"],
        "statistics_and_factorisation_over_pass": (timers["statistics"] + timers["factorisation"])
        / pass_seconds,
        # Layer groups replay the calibration batches: each of the 2G − 1 passes produces the
        # gradients of its group's statistics, so the same work against all of those passes.
        "statistics_and_factorisation_over_calibration_passes": (
            timers["statistics"] + timers["factorisation"]
        )
        / (passes * pass_seconds),
        # Every layer's statistics and factorisation once (its first estimate), against one
        # pass: the cost of building the estimate, whatever the layer groups.
        "statistics_and_factorisation_once_over_pass": (
            timers["statistics_once"] + timers["factorisation_once"]
        )
        / pass_seconds,
        "statistics_gflops": flops["statistics"] / timers["statistics"] / 1e9,
        "factorisation_gflops": flops["factorisation"] / timers["factorisation"] / 1e9,
        "statistics_products": ", ".join(sorted(products)) or "float32",
        "token_fraction": method.token_fraction,
        "matmul_bfloat16_gflops": _matmul_gflops(torch.bfloat16)
        if native_bfloat16_products(torch.device("cpu"))
        else None,
        "matmul_float32_gflops": _matmul_gflops(torch.float32),
        "matmul_float64_gflops": _matmul_gflops(torch.float64),
        "sparsity": report.sparsity,
        "factorisation_fallbacks": report.factorisation_fallbacks,
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--budget",
        default="default",
        help="memory_budget_mb: 'default', 'largest' (the largest layer's Q) or MB",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results file (default docs/results/scale.json)"
    )
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="run each size with MALLOC_MMAP_THRESHOLD_=65536 (peak RSS = peak memory in use)",
    )
    parser.add_argument(
        "--structure",
        choices=["block_diagonal", "kronecker"],
        default="block_diagonal",
        help="FLS's Q (default block_diagonal, whose statistics the memory goal is stated in; "
        "kronecker is the fls default)",
    )
    parser.add_argument(
        "--sequences",
        type=int,
        default=SEQUENCES,
        help=f"calibration sequences of {TOKENS} tokens (default {SEQUENCES})",
    )
    parser.add_argument(
        "--token-fraction",
        type=float,
        default=None,
        help="fraction of each sequence's tokens in the Kronecker statistics (default: fls's)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.budget, structure=args.structure,
                                 sequences=args.sequences,
                                 token_fraction=args.token_fraction)))  # fmt: skip
        return Path()
    from benchmarks.common import write_json

    runs = []
    for name in args.sizes:
        command = [sys.executable, "-m", "benchmarks.scale", "--one", name, "--budget",
                   args.budget, "--structure", args.structure, "--sequences",
                   str(args.sequences)]  # fmt: skip
        if args.token_fraction is not None:
            command += ["--token-fraction", str(args.token_fraction)]
        env = {**os.environ, **({ALLOCATOR_ENV: "65536"} if args.live_memory else {})}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"{name:>10}: {run['pruned_weights'] / 1e6:.1f} M weights, {run['layer_groups']} "
              f"group(s), peak +{run['peak_beyond_mb']:.0f} MB "
              f"({run['peak_beyond_over_largest_q']:.2f}× largest Q), {run['seconds']:.0f} s; "
              f"stats+factorisation {run['statistics_and_factorisation_over_pass']:.1f}× a "
              f"pass ({run['statistics_and_factorisation_over_calibration_passes']:.2f}× the "
              f"{run['calibration_passes']} calibration passes; every layer once "
              f"{run['statistics_and_factorisation_once_over_pass']:.2f}× a pass); "
              f"{run['statistics_gflops']:.1f} / {run['factorisation_gflops']:.1f} "
              f"GFLOP/s ({run['statistics_products']} statistics) vs matmul "
              f"{run['matmul_float32_gflops']:.0f} (f32), "
              f"{run['matmul_float64_gflops']:.0f} (f64)", flush=True)  # fmt: skip
    payload = {
        "command": "python -m benchmarks.scale " + " ".join(argv or sys.argv[1:]),
        "calibration": f"{args.sequences} random sequences of {TOKENS} tokens, batches of {BATCH}",
        "method": f"fls with {STRUCTURE_NAMES[args.structure]}, 1 step over the calibration "
        "sequences, 50%, sampled Gaussian Fisher on the mean-pooled output",
        "memory_budget": args.budget,
        "allocator": f"glibc, {ALLOCATOR_ENV}=65536" if args.live_memory else "glibc defaults",
        "runs": runs,
    }
    path = write_json("scale", payload, out=args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
