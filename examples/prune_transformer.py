"""Train a small patch transformer on Fashion-MNIST, then prune it: 2:4 and unstructured.

1. trains :class:`~lightning_fls.models.PatchTransformer` (pre-norm encoder, 16 tokens of 7×7
   patches, ``nn.MultiheadAttention``) for a few epochs;
2. prunes a copy of it **one-shot** to the 2:4 pattern (and to ``--sparsity`` unstructured)
   with each ``--methods`` entry: FLS, SparseGPT and magnitude by default;
3. prunes it **gradually** to 2:4 with :class:`~lightning_fls.FLSPruningCallback` over
   ``--prune-epochs`` more epochs, fine-tuning one more;
4. prints a table of test accuracies and checks that every pruned weight follows 2:4.

Only the weights inside the transformer blocks are pruned (attention in- and out-projections,
MLP): the library's default for models with attention; the patch embedding and head stay
dense.

    .venv/bin/python examples/prune_transformer.py             # ~4 min on 2 CPU cores
    .venv/bin/python examples/prune_transformer.py --epochs 1 --train-size 5000   # ~1 min

Data: the Debian package ``dataset-fashion-mnist``, ``--data-dir``, or ``--download`` (with
``--data-dir``).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fls import FLSPruningCallback, prunable_layers, prune_one_shot
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.models import PatchTransformer
from lightning_fls.patterns import follows_pattern, parse_pattern


def make_trainer(epochs: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )


def evaluate(model: PatchTransformer, data: FashionMNISTDataModule) -> dict[str, Any]:
    [metrics] = make_trainer(1).test(model, datamodule=data, verbose=False)
    weights = [
        getattr(a.module, a.key_parameter).detach()
        for a in prunable_layers(model, None, None).values()
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    two_four = parse_pattern("2:4")
    assert two_four is not None
    return {
        "accuracy": float(metrics["test_acc"]),
        "sparsity": zeros / sum(w.numel() for w in weights),
        "2:4": all(follows_pattern(w, two_four) for w in weights),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="dense training epochs")
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.7, help="unstructured target")
    parser.add_argument("--methods", nargs="+", default=["fls", "sparsegpt", "magnitude"])
    parser.add_argument("--samples", type=int, default=1024, help="calibration examples")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--train-size", type=int, default=None, help="first N training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = FashionMNISTDataModule(
        data_dir=args.data_dir,
        download=args.download,
        task="classification",
        batch_size=100,
        train_size=args.train_size,
        seed=args.seed,
    )
    data.prepare_data()
    data.setup("fit")
    pl.seed_everything(args.seed, verbose=False)
    dense = PatchTransformer()
    start = time.perf_counter()
    make_trainer(args.epochs).fit(dense, datamodule=data)
    print(f"dense model trained in {time.perf_counter() - start:.0f} s")
    results = {"dense": evaluate(dense, data)}
    assert data.train is not None
    calibration = torch.utils.data.DataLoader(
        data.train, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for method in args.methods:
        for pattern, sparsity in (("2:4", 0.5), (None, args.sparsity)):
            model = copy.deepcopy(dense).eval()
            prune_one_shot(
                model,
                calibration,
                model.loss,
                sparsity=sparsity,
                method=method,
                pattern=pattern,
                samples_per_step=args.samples,
            )
            results[f"one-shot {method} {pattern or sparsity}"] = evaluate(model, data)
    model = copy.deepcopy(dense)
    pruning = FLSPruningCallback(
        pattern="2:4", start_epoch=0, end_epoch=args.prune_epochs, samples_per_step=args.samples
    )
    make_trainer(args.prune_epochs + 1, [pruning]).fit(model, datamodule=data)
    results["gradual fls 2:4"] = evaluate(model, data)

    print(f"\n{'model':32s} {'accuracy':>8s} {'sparsity':>8s}  2:4")
    for name, result in results.items():
        print(
            f"{name:32s} {result['accuracy']:8.4f} {result['sparsity']:8.3f}  "
            f"{'yes' if result['2:4'] else 'no'}"
        )
    return results


if __name__ == "__main__":
    main()
