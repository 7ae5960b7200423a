"""Train the FishLeg autoencoder on Fashion-MNIST and prune it to 90% with FLSPruningCallback.

Two runs of the same length from the same seed: a dense reference, and one where the callback
prunes with the cubic schedule from the end of epoch ``start`` to ``end`` and fine-tunes after.
It prints both test losses (Bernoulli NLL per image, nats) and the achieved sparsity.

    .venv/bin/python examples/prune_autoencoder.py                  # ~5 min on 2 CPU cores
    .venv/bin/python examples/prune_autoencoder.py --preset full    # longer, better converged
    .venv/bin/python examples/prune_autoencoder.py --method magnitude   # a baseline instead

Data: the Debian package ``dataset-fashion-mnist``, ``--data-dir``, or ``--download`` (with
``--data-dir``) to fetch and checksum the files.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterator

import lightning.pytorch as pl
import torch

from lightning_fls import FLSPruningCallback
from lightning_fls.data import FashionMNISTDataModule
from lightning_fls.models import FishLegAutoencoder

PRESETS = {
    # epochs, first pruning point (end of epoch), epoch by which the target is reached
    "quick": {"epochs": 10, "start": 2, "end": 8},
    "full": {"epochs": 40, "start": 5, "end": 30},
    "smoke": {"epochs": 2, "start": 0, "end": 1},
}


# Lightning's advert for its cloud logger, logged (INFO) by every Trainer without a LitLogger.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
# torch's FutureWarning about the LeafSpec that Lightning's own pytree helper still constructs.
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _not_the_litlogger_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LITLOGGER_TIP)


@contextlib.contextmanager
def without_lightning_notices() -> Iterator[None]:
    """Hide the two notices above, which a user of this example cannot act on, and nothing else.

    Scoped to the ``with`` block: the warning filter is restored on exit and the logging filter
    removed. Lightning's other messages and every other warning still show.
    """
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addFilter(_not_the_litlogger_tip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION, category=FutureWarning)
            yield
    finally:
        rank_zero.removeFilter(_not_the_litlogger_tip)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    with without_lightning_notices():
        return run(argv)


def run(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--method", default="fls")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--train-size", type=int, default=None, help="first N training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]

    data = FashionMNISTDataModule(
        data_dir=args.data_dir, download=args.download, train_size=args.train_size, seed=args.seed
    )
    pl.seed_everything(args.seed, verbose=False)
    initial = FishLegAutoencoder()
    results: dict[str, dict[str, float]] = {}
    for name in ("dense", "pruned"):
        model = copy.deepcopy(initial)
        # tqdm's bar whatever else is installed (Lightning switches to Rich's when `rich` is).
        callbacks: list[pl.Callback] = [pl.callbacks.TQDMProgressBar()]
        if name == "pruned":
            callbacks.append(
                FLSPruningCallback(
                    target_sparsity=args.sparsity,
                    schedule="cubic",
                    start_epoch=preset["start"],
                    end_epoch=preset["end"],
                    method=args.method,
                )
            )
        trainer = pl.Trainer(
            max_epochs=preset["epochs"],
            callbacks=callbacks,
            logger=pl.loggers.CSVLogger("runs", name=f"autoencoder_{name}"),
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
        )
        print(f"== {name}: {preset['epochs']} epochs", flush=True)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        [metrics] = trainer.test(model, datamodule=data, verbose=False)
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        results[name] = {
            "test_loss": metrics["test_loss"],
            "sparsity": zeros / sum(w.numel() for w in weights),
            "seconds": seconds,
        }

    dense, pruned = results["dense"], results["pruned"]
    print()
    print(f"FishLeg autoencoder on Fashion-MNIST, {preset['epochs']} epochs, method={args.method}")
    print(f"{'model':8s} {'sparsity':>9s} {'test loss':>10s} {'train time':>11s}")
    for name, r in results.items():
        print(f"{name:8s} {r['sparsity']:9.4f} {r['test_loss']:10.2f} {r['seconds']:10.0f}s")
    change = 100 * (pruned["test_loss"] / dense["test_loss"] - 1)
    ratio = pruned["seconds"] / dense["seconds"]
    print(f"pruned vs dense: test loss {change:+.1f}%, training time x{ratio:.2f}")
    return results


if __name__ == "__main__":
    main()
