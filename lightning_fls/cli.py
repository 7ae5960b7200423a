"""The ``fls`` command: LightningCLI over any LightningModule and data module.

``fls fit --config examples/configs/autoencoder.yaml`` trains and prunes the FishLeg autoencoder
on Fashion-MNIST; ``fls fit --print_config`` shows every option with its default. The example
models (:mod:`lightning_fls.models`) and data (:mod:`lightning_fls.data`) are there to start
from; any importable class works (``--model.class_path my.module.Model``). The pruning
callback goes under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_fls.FLSPruningCallback
          init_args: {target_sparsity: 0.9, schedule: cubic, start_epoch: 2, end_epoch: 8}

Switch the logger to Weights & Biases with ``--trainer.logger WandbLogger
--trainer.logger.offline true`` (offline needs no account and no network).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import lightning_fls.data
import lightning_fls.models  # noqa: F401 (registers the example classes for short names)


def main(args: Sequence[str] | None = None) -> None:
    """Run the ``fls`` command line (``args`` defaults to ``sys.argv[1:]``).

    A bad value in the configuration (an out-of-range argument, a missing data directory) ends
    the command with ``fls: error: <the message>`` on stderr and exit status 2, as a parse error
    does, rather than a traceback through jsonargparse; set ``FLS_TRACEBACK=1`` to see it.

    Raises:
        SystemExit: With status 2 on a configuration error.
    """
    try:
        LightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if args is None else list(args),
            parser_kwargs={"prog": "fls"},
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get("FLS_TRACEBACK"):
            raise
        root: BaseException = error
        while root.__cause__ is not None:
            root = root.__cause__
        print(f"fls: error: {root}\n(set FLS_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
