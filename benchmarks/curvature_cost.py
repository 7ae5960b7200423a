"""Cost of Q·V and of one auxiliary step per block structure, relative to one training step.

Model: the FishLeg benchmark autoencoder 784-1000-500-250-30-250-500-1000-784 (2.84 M weights),
batch 100, Adam. Every aux step uses the default settings (preconditioned, Adam on λ) and the
empirical Fisher of one captured batch. Every time is the median of interleaved repeats in one
run and is reported as a ratio to the training step measured in the same run (the machines are
shared and noisy).

    .venv/bin/python -m benchmarks.curvature_cost          # -> docs/results/curvature_cost.json
    .venv/bin/python -m benchmarks.curvature_cost --quick  # small model, seconds
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    AUTOENCODER_SIZES,
    autoencoder,
    bernoulli_loss,
    time_interleaved,
    write_json,
)
from lightning_fls.fishleg import (
    AuxiliaryOptimizer,
    CurvatureBlock,
    StructurePolicy,
    relative_damping,
)
from lightning_fls.layers import ExampleGradients, GradientCapture, LayerAdapter, find_layers


@dataclass(frozen=True)
class Variant:
    """A block structure and the options of its aux step."""

    name: str
    structure: str
    use_scale: bool = True
    probe: str = "gaussian"


VARIANTS = (
    Variant("kronecker", "kronecker"),
    Variant("kronecker_no_scale", "kronecker", use_scale=False),
    Variant("kronecker_no_scale_outer_probe", "kronecker", use_scale=False, probe="outer"),
    Variant("block_diagonal_50", "block_diagonal"),
    Variant("diagonal", "diagonal"),
)


def build(
    variant: Variant, adapters: dict[str, LayerAdapter], gamma: float
) -> dict[str, CurvatureBlock]:
    policy = StructurePolicy(default=variant.structure, use_scale=variant.use_scale)  # type: ignore[arg-type]
    return {
        key: policy.make_block(variant.structure, a.canonical_shape, init_scale=1 / gamma)  # type: ignore[arg-type]
        for key, a in adapters.items()
    }


def optimizer_state_bytes(aux: AuxiliaryOptimizer) -> int:
    total = 0
    for state in aux.optimizer.state.values():
        total += sum(
            t.numel() * t.element_size()
            for t in state.values()
            if torch.is_tensor(t) and t.dim() > 0
        )
    return total


def run(
    sizes: tuple[int, ...], batch: int, repeats: int, variants: tuple[Variant, ...]
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = autoencoder(sizes)
    x = torch.rand(batch, sizes[0])
    target = (torch.rand(batch, sizes[0]) < x).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    adapters = find_layers(model)
    capture = GradientCapture(adapters)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        bernoulli_loss(model(x), target).backward()
        optimizer.step()

    def train_step_with_capture() -> dict[str, ExampleGradients]:
        with capture:
            train_step()
        return capture.example_gradients()

    grads = train_step_with_capture()
    damping = relative_damping(grads)
    gamma = next(iter(damping.values()))
    fvps = {key: g.fvp for key, g in grads.items()}
    base = time_interleaved(
        {"train": train_step, "train+capture": train_step_with_capture}, repeats=repeats
    )
    train = base["train"]

    results: dict[str, Any] = {}
    for variant in variants:
        blocks = build(variant, adapters, gamma)
        aux = AuxiliaryOptimizer(blocks, lr=1e-3, probe=variant.probe)  # type: ignore[arg-type]
        vectors = {key: torch.randn(b.shape) for key, b in blocks.items()}

        def qv_all(blocks: dict[str, CurvatureBlock] = blocks, vectors: dict = vectors) -> None:
            with torch.no_grad():
                for key, block in blocks.items():
                    block.qv(vectors[key])

        def aux_all(aux: AuxiliaryOptimizer = aux) -> None:
            aux.step(fvps, damping)

        per_layer_aux = {}
        for key in blocks:
            layer_aux = AuxiliaryOptimizer({key: blocks[key]}, lr=1e-3, probe=variant.probe)  # type: ignore[arg-type]
            per_layer_aux[key] = lambda a=layer_aux, k=key: a.step({k: fvps[k]}, damping)
        per_layer_qv = {
            key: (lambda b=block, v=vectors[key]: b.qv(v).sum()) for key, block in blocks.items()
        }
        timed = time_interleaved(
            {"qv": qv_all, "aux_step": aux_all, "train": train_step}, repeats=repeats
        )
        with torch.no_grad():
            layer_qv = time_interleaved(per_layer_qv, repeats=repeats)
        layer_aux = time_interleaved(per_layer_aux, repeats=max(3, repeats // 2))
        aux_bytes = sum(b.aux_state_bytes() for b in blocks.values())
        results[variant.name] = {
            "structure": variant.structure,
            "use_scale": variant.use_scale if variant.structure == "kronecker" else None,
            "probe": variant.probe,
            "precondition": aux.precondition,
            "qv_seconds": timed["qv"],
            "aux_step_seconds": timed["aux_step"],
            "train_step_seconds": timed["train"],
            "qv_over_train_step": timed["qv"] / timed["train"],
            "aux_step_over_train_step": timed["aux_step"] / timed["train"],
            "aux_state_mb": aux_bytes / 2**20,
            "aux_state_with_adam_mb": (aux_bytes + optimizer_state_bytes(aux)) / 2**20,
            "per_layer": {
                key: {
                    "shape": list(blocks[key].shape),
                    "qv_over_train_step": layer_qv[key] / timed["train"],
                    "aux_step_over_train_step": layer_aux[key] / timed["train"],
                }
                for key in blocks
            },
        }
        print(
            f"{variant.name:32s} qv {timed['qv'] / timed['train']:7.2f}x  "
            f"aux step {timed['aux_step'] / timed['train']:7.2f}x  "
            f"state {results[variant.name]['aux_state_with_adam_mb']:8.1f} MB (with Adam)"
        )
        del blocks, aux, per_layer_aux
    return {
        "model": "-".join(map(str, sizes)),
        "weights": sum(p.numel() for p in model.parameters()),
        "batch": batch,
        "repeats": repeats,
        "train_step_seconds": train,
        "capture_overhead_over_train_step": base["train+capture"] / train - 1.0,
        "variants": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small model and few repeats (smoke test)"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="output JSON path")
    args = parser.parse_args()
    sizes = (64, 48, 32, 8, 32, 48, 64) if args.quick else AUTOENCODER_SIZES
    repeats = 2 if args.quick else args.repeats
    payload = run(sizes, args.batch, repeats, VARIANTS)
    payload["command"] = "python -m benchmarks.curvature_cost" + (" --quick" if args.quick else "")
    name = "curvature_cost_quick" if args.quick else "curvature_cost"
    print(f"wrote {write_json(name, payload, args.out)}")


if __name__ == "__main__":
    main()
