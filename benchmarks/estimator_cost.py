"""Time and memory to build each method's inverse-Fisher estimate from N samples.

The question of the FLS rebuttal's timing and memory tables: how long does it take to turn N
samples (gradients of batches of 16) into an inverse-curvature estimate, and how much memory does
the estimate need as the network grows? Every method starts from the same batches and includes
computing its own gradients:

* ``fls``: per-example gradients captured from each batch, block-50 Fisher statistics and the
  closed-form optimum of the auxiliary loss for block-diagonal Q (``prune_one_shot``'s default);
* ``fls+kronecker``: per-example gradients, K-FAC statistics, then one auxiliary step per batch
  (defaults: outer-product probes, preconditioned);
* ``kfac``: the K-FAC statistics alone;
* ``obert``: block-50 inverse of the empirical Fisher of the N/16 batch gradients, as the
  library's ``obert`` builds it (block Fisher folded batch by batch, each block inverted once);
* ``mfac``: static M-FAC (blocks of 2000) on the same gradients;
* ``diag_fisher``: the empirical diagonal.

Times and peak memory growth (process RSS, Linux) are measured in one run, one method after the
other; the ratios to FLS are the figures to quote.

    .venv/bin/python -m benchmarks.estimator_cost            # -> docs/results/estimator_cost.json
    .venv/bin/python -m benchmarks.estimator_cost --quick
"""

from __future__ import annotations

import argparse
import gc
import importlib
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import autoencoder, write_json
from lightning_fls._memory import PeakMemory
from lightning_fls.baselines import BlockWoodburyInverse, MFACInverse
from lightning_fls.fishleg import (
    AuxiliaryOptimizer,
    StatisticsAccumulator,
    StructurePolicy,
    build_blocks,
    relative_damping,
)
from lightning_fls.fishleg.registry import new_layer_statistics
from lightning_fls.layers import GradientCapture, find_layers
from lightning_fls.methods._gradients import BlockGramStream

BATCH = 16


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lenet_300_100 (0.27 M)": lambda: mlp((784, 300, 100, 10)),
    "mlp_784_1000_300_10 (1.09 M)": lambda: mlp((784, 1000, 300, 10)),
    "autoencoder (2.84 M)": autoencoder,
}


def batches(model: nn.Module, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    d_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    d_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    return [(torch.rand(BATCH, d_in), torch.randint(0, d_out, (BATCH,))) for _ in range(n // BATCH)]


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if outputs.shape[1] == 784:  # autoencoder: reconstruct random "images"
        return F.binary_cross_entropy_with_logits(
            outputs, torch.rand_like(outputs), reduction="sum"
        ) / len(outputs)
    return F.cross_entropy(outputs, targets)


def build(method: str, model: nn.Module, data: list) -> dict[str, Any]:
    layers = find_layers(model)
    capture = GradientCapture(layers, keep_outputs=True)

    def per_example(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
        with capture:
            capture.backward(loss_fn(model(x), y))
            grads = capture.example_gradients()
        capture.clear()
        return grads

    first = per_example(*data[0])
    gamma = next(iter(relative_damping(first, 1e-2).values()))
    state_bytes = 0
    if method in ("fls", "fls+kronecker", "kfac"):
        structure = "block_diagonal" if method == "fls" else "kronecker"
        policy = StructurePolicy(default=structure)  # type: ignore[arg-type]
        # As the library builds them: statistics folded as the batches come (records kept only
        # for the auxiliary steps), each block allocated unwritten and started from its
        # layer's statistics in place.
        stats = {k: new_layer_statistics(k, a, policy) for k, a in layers.items()}
        stream: list[dict[str, Any]] = []
        for x, y in data:
            grads = per_example(x, y)
            for key, g in grads.items():
                stats[key].update(g)
            if method == "fls+kronecker":
                stream.append(grads)
        blocks = {}
        for key, adapter in layers.items():
            block = build_blocks(
                {key: adapter}, policy=policy, init_scale=1 / gamma, uninitialised=True
            )[key]
            block.init_from_statistics(stats.pop(key).result(release=True), gamma)
            blocks[key] = block
        if method == "fls+kronecker":
            aux = AuxiliaryOptimizer(blocks)
            for grads in stream:
                aux.step({k: g.fvp for k, g in grads.items()}, gamma)
            state_bytes += sum(
                t.numel() * t.element_size()
                for s in aux.optimizer.state.values()
                for t in s.values()
                if t.dim() > 0
            )
        state_bytes += sum(b.aux_state_bytes() for b in blocks.values())
    elif method == "diag_fisher":
        stats = {k: StatisticsAccumulator({"diag_fisher"}) for k in layers}
        for x, y in data:
            for key, g in per_example(x, y).items():
                stats[key].update(g)
        state_bytes = sum(a.canonical_weight().numel() * 4 for a in layers.values())
    elif method == "obert":  # as the library's obert: block Fisher folded batch by batch
        masks = {k: torch.ones(a.canonical_shape) for k, a in layers.items()}
        fisher = BlockGramStream(masks, BATCH, block_size=50)
        for x, y in data:
            fisher.update(per_example(x, y))
        for key in fisher.held():
            statistics = fisher.pop(key)
            assert statistics.block_fisher is not None
            estimate = BlockWoodburyInverse.from_block_fisher(
                layers[key].canonical_shape,
                statistics.block_fisher,
                num_gradients=statistics.num_examples,
                damping=gamma,
            )
            state_bytes += estimate.state_bytes()
    else:
        gradients: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
        for x, y in data:
            for key, g in per_example(x, y).items():  # mean of the 16 per-example gradients
                gradients[key].append(g.combine(torch.full((1, g.batch_size), 1.0 / g.batch_size)))
        for key in layers:
            mfac = MFACInverse(torch.cat(gradients[key]), damping=gamma)
            state_bytes += mfac.state_bytes()
            gradients[key] = []
    return {"state_mb": state_bytes / 2**20}


def _measure_here(method: str, model_name: str, samples: int) -> dict[str, Any]:
    model = MODELS[model_name]()
    build(
        method, model, batches(model, 2 * BATCH)
    )  # warm-up: first-call costs are not the method's
    data = batches(model, samples)
    gc.collect()
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        out = build(method, model, data)
        out["seconds"] = time.perf_counter() - start
    out["peak_mb"] = memory.peak_mb
    return out


def measure(method: str, model_name: str, samples: int) -> dict[str, Any]:
    """Run one measurement in a fresh process, so that peak memory is the method's own."""
    module = importlib.import_module("benchmarks.estimator_cost")  # picklable by module name
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(module._measure_here, (method, model_name, samples))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["fls", "fls+kronecker", "kfac", "obert", "mfac", "diag_fisher"],
    )
    args = parser.parse_args()
    methods = args.methods
    sample_sizes = [512] if args.quick else [512, 2048, 10000]
    time_model = "lenet_300_100 (0.27 M)"
    timing: dict[str, Any] = {}
    for n in sample_sizes:
        timing[str(n)] = {m: measure(m, time_model, n) for m in methods}
        fls = timing[str(n)].get("fls", {}).get("seconds")
        for m, r in timing[str(n)].items():
            r["seconds_over_fls"] = r["seconds"] / fls if fls else None
            peak, state = r["peak_mb"], r["state_mb"]
            print(f"N={n:6d} {m:12s} {r['seconds']:8.2f} s peak {peak} MB state {state:.1f} MB")
    memory: dict[str, Any] = {}
    for name in list(MODELS)[:1] if args.quick else list(MODELS):
        memory[name] = {m: measure(m, name, 512 if args.quick else 2048) for m in methods}
        for m, r in memory[name].items():
            peak, state = r["peak_mb"], r["state_mb"]
            print(f"{name:30s} {m:12s} peak {peak} MB state {state:.1f} MB {r['seconds']:.1f} s")
    payload = {
        "command": "python -m benchmarks.estimator_cost" + (" --quick" if args.quick else ""),
        "gradient_batch": BATCH,
        "timing_model": time_model,
        "timing": timing,
        "memory_samples": 2048,
        "memory": memory,
    }
    print(
        f"wrote {write_json('estimator_cost_quick' if args.quick else 'estimator_cost', payload)}"
    )


if __name__ == "__main__":
    main()
