"""``FLSPruningCallback``: gradual FishLeg Surgeon pruning inside a Lightning ``Trainer``.

The callback is a thin shell: the maths lives in :mod:`lightning_fls.engine` (curvature
estimates, OBS steps, masks) and :mod:`lightning_fls.schedules`. What it does, hook by hook:

* ``setup``: finds the LightningModule's prunable layers (Linear, Conv2d and registered types)
  and checks ``include``/``exclude`` and the schedule against them;
* ``on_fit_start``: builds the pruning engine on the model's device (masks from the weights that
  are already zero, or from a checkpoint) and hooks every optimizer so that the masks are
  re-applied after **every** optimizer step (momentum, Adam moments, weight decay and clipping
  cannot revive a pruned weight);
* ``on_train_batch_start`` / ``on_after_backward``: on every ``aux_every_n_steps``-th batch of an
  epoch that ends at a pruning point, records the per-example gradients of the training step's
  **own** backward (module hooks attached for that step only; the activations and output
  gradients kept, at most ``samples_per_step`` examples, newest first; the epoch's earlier
  batches, whose records would be dropped, are not recorded once a record's size is known);
* at each pruning point (an epoch end, or every ``prune_every_n_steps`` steps) the schedule's
  sparsity is reached with ``recompute_steps`` OBS step(s) on the recorded gradients, and the
  sparsity, losses, damping and cost are logged under ``fls/``;
* ``on_train_end``: optionally logs the sparse-storage report, and everything the callback
  attached is removed.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_fls._distributed import gather_records, mean_across_ranks, sum_across_ranks
from lightning_fls._validation import (
    check_choice,
    check_non_negative_int,
    check_patterns,
    check_positive_int,
)
from lightning_fls.calibration import StepData
from lightning_fls.engine import PruningEngine, model_device, weight_of
from lightning_fls.export import sparse_size_report
from lightning_fls.fishleg import StructurePolicy
from lightning_fls.layers import ExampleGradients, GradientCapture, LayerAdapter, prunable_layers
from lightning_fls.masks import CastMasks, Scope, layer_sparsities, sparsity_of
from lightning_fls.methods import BUILTIN_METHODS, PruningMethod, resolve_method
from lightning_fls.options import PruningOptions, build_options
from lightning_fls.patterns import parse_pattern
from lightning_fls.schedules import Schedule, SparsitySchedule, linear_steps
from lightning_fls.structured.compact import compact
from lightning_fls.structured.saliency import StructuredUnits
from lightning_fls.structured.setup import UNSTRUCTURED, check_granularity, structured_units

DEFAULT_TARGET_SPARSITY = 0.9
"""The final sparsity when neither ``target_sparsity`` nor a ``pattern`` is given."""
STATE_VERSION = 3
"""Version of the checkpointed callback state. 2 added the fault counters and the damping scale,
3 the safeguard and factorisation-fallback counters; older states are upgraded on load."""
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
_LAYER_LOG_LIMIT = 50


class FLSPruningCallback(pl.Callback):
    """Gradually prune a LightningModule with the FishLeg Surgeon (or a baseline) while it trains.

    Pruning points are the ends of epochs ``start_epoch + 1 … end_epoch`` (counted in epochs
    completed; or every ``prune_every_n_steps`` optimizer steps in between). At each point the
    schedule's sparsity ``s(t)`` is reached with Optimal Brain Surgeon: saliencies
    ``ρ = w²/(2[Q]_qq)`` with ``Q ≈ (F + γI)⁻¹`` estimated from the per-example gradients of
    recent training steps, OBS corrections of the surviving weights, and masks that keep pruned
    weights exactly zero after every optimizer step. With ``schedule="cubic"`` the sparsity is
    ``s_f(1 − (1 − (t − start)/(end − start))³)``; ``target_sparsity`` is reached by the start of
    epoch ``end_epoch`` and held afterwards (fine-tuning).

    Args:
        target_sparsity: Final fraction of pruned weights, in ``[0, 1)`` (default 0.9, or
            ``n/m`` with a ``pattern``).
        schedule: ``"cubic"`` (default), ``"linear"``, ``"oneshot"`` (all at the first pruning
            point), or a callable ``epoch → sparsity`` (non-decreasing, values in ``[0, 1)``).
        start_epoch: Pruning starts after this many epochs of training (>= 0).
        end_epoch: ``target_sparsity`` is reached by the start of this epoch (> start_epoch).
        method: ``"fls"`` (default: FishLeg Surgeon with Kronecker Q), ``"kfac"``,
            ``"obert"``, ``"mfac"``, ``"diag_fisher"``, ``"sparsegpt"``, ``"wanda"``,
            ``"magnitude"``, a name added with :func:`~lightning_fls.register_method`, or a
            :class:`~lightning_fls.methods.PruningMethod` instance with its own options (in
            YAML: ``class_path``/``init_args``).
        pattern: ``None`` (unstructured) or ``"N:M"``, e.g. ``"2:4"``: N of every M
            consecutive weights of a row pruned. Each pruning point takes weights in saliency
            order with at most N per group; the last fills every group, choosing each group's
            set by its joint OBS cost. ``target_sparsity`` defaults to ``N/M`` and may not
            exceed it.
        scope: ``"global"`` (one ranking over all layers) or ``"layer"`` (uniform per layer);
            default: the method's (``"global"``; ``"layer"`` for ``sparsegpt`` and ``wanda``).
        include: Glob patterns (fnmatch) of weight names to prune; default: every Linear,
            Conv2d and MultiheadAttention weight that is not frozen (``requires_grad=False``),
            and in a model with attention only those inside its transformer blocks (not the
            embeddings or the output head). An entry that is exactly a norm's or embedding's
            weight name prunes it too. A pattern that matches nothing, or that selects a
            frozen weight, is an error.
        exclude: Glob patterns of weight names not to prune.
        damping: γ relative to the mean of diag F over the pruned layers (> 0; default 1e-2);
            an error for methods that use no Fisher damping (``sparsegpt``, ``wanda``,
            ``magnitude``).
        aux_every_n_steps: Record the training step's per-example gradients on every n-th batch
            of an epoch that ends at a pruning point (the auxiliary cadence, >= 1); of those,
            only the last ones whose records can be among the ``samples_per_step`` kept.
        samples_per_step: Most examples kept for one curvature estimate (>= 1).
        recompute_steps: OBS steps per pruning point, the curvature re-estimated on the
            surviving weights between them (>= 1).
        prune_every_n_steps: Prune every n optimizer steps inside the pruning window instead of
            at epoch ends (None: at epoch ends).
        fisher: ``"empirical"`` (the training loss's own gradients) — the only kind a callback
            can record without a second backward.
        structure: ``fls``/``kfac`` only: per-layer block structure (a ``StructurePolicy``;
            default Kronecker; ``StructurePolicy("block_diagonal")`` for blocks of 50).
        refine_passes: ``fls`` only: passes of FishLeg auxiliary (Adam) steps over the recorded
            batches after the statistics-based start of Q (default 0; for block-diagonal Q the
            start is already the auxiliary loss's exact optimum).
        aux_lr: ``fls`` only: learning rate of those auxiliary steps (> 0; default 1e-3).
        token_fraction: ``fls``/``kfac`` only: fraction of each example's positions (tokens,
            conv output pixels) whose outer products enter the Kronecker statistics, in
            ``(0, 1]`` (default 0.5); a fresh uniform draw per batch, the sums scaled to stay
            unbiased. Layers with one position per example keep every example.
        row_update: ``fls`` only: how the OBS update inside each row of a Kronecker Q is
            solved. ``"refined_sweep"`` (the callback's default): SparseGPT's column sweep, one
            factorisation per layer, then 10 conjugate-gradient steps towards the exact joint
            update (:func:`~lightning_fls.obs.kronecker_sweep_obs_update`); ``"joint"``:
            exactly, one factorisation per row
            (:func:`~lightning_fls.obs.kronecker_row_obs_update`); ``"sweep"``: the sweep alone;
            ``"auto"`` (:func:`~lightning_fls.prune_one_shot`'s default): exactly where that
            costs at most 4× the refined sweep's arithmetic.
            Measured on the autoencoder (``docs/callback.md#what-it-costs``): the refined sweep
            ended within 0.02-0.09 nats of the joint solve in the 3-seed gradual protocol at
            about half its pruning time; the sweep alone cost least and lost 0.3-0.7 nats.
        max_layer_sparsity: Optional cap on any one layer's sparsity (global scope).
        granularity: ``"unstructured"`` (single weights, the default), or whole units:
            ``"neuron"``, ``"channel"`` or ``"head"`` (:mod:`lightning_fls.structured`); the
            sparsities are then fractions of units removed over every layer whose units can be
            removed, each keeping at least one. Removed units' weights, biases and the
            matching input columns of the next layers stay zero (``method="kfac"`` measured
            best for neurons and channels, block-diagonal ``fls`` for heads:
            ``docs/structured.md``);
            :func:`~lightning_fls.compact` cuts them out after training (or
            ``compact_on_train_end``). Not with ``pattern``, ``scope="layer"`` or ``sparsegpt``.
        compact_on_train_end: With a ``granularity`` other than ``"unstructured"``: at the end of
            training, cut the removed units out of the LightningModule in place
            (:func:`~lightning_fls.compact` with ``inplace=True``), so that ``trainer.test``,
            ``trainer.predict`` and ``trainer.save_checkpoint`` after ``fit`` see the smaller
            model, and log ``fls/params`` (its parameter count) and ``fls/params_fraction``
            (of the count before). Skipped with a warning when no unit was removed. A
            checkpoint saved afterwards holds the smaller shapes: load it into a model compacted
            the same way. The callback cannot fit again after compacting.
        log_layer_sparsity: Log ``fls/sparsity/<weight>`` per layer (default: when there are at
            most 50 pruned layers).
        make_permanent: At the end of training, re-apply the masks a last time and log the
            sparse-storage report (``fls/dense_mb``, ``fls/sparse_mb``). Everything the callback
            attached is removed at ``teardown`` either way.
        seed: Seed of the random probes used for the logged auxiliary loss.
        verbose: Print one line per pruning point.
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        schedule: Schedule = "cubic",
        start_epoch: int = 0,
        end_epoch: int = 10,
        method: str | PruningMethod = "fls",
        pattern: str | None = None,
        scope: Scope | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        damping: float | None = None,
        aux_every_n_steps: int = 10,
        samples_per_step: int = 1024,
        recompute_steps: int = 1,
        prune_every_n_steps: int | None = None,
        fisher: Literal["empirical"] = "empirical",
        structure: StructurePolicy | None = None,
        refine_passes: int | None = None,
        aux_lr: float | None = None,
        token_fraction: float | None = None,
        row_update: str | None = None,
        max_layer_sparsity: float | None = None,
        granularity: str = "unstructured",
        compact_on_train_end: bool = False,
        log_layer_sparsity: bool | None = None,
        make_permanent: bool = True,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        start_epoch = check_non_negative_int("start_epoch", start_epoch)
        end_epoch = check_non_negative_int("end_epoch", end_epoch)
        nm = parse_pattern(pattern)
        if target_sparsity is None:
            target_sparsity = DEFAULT_TARGET_SPARSITY if nm is None else nm.sparsity
        # Checks target_sparsity, the schedule and end_epoch > start_epoch, naming them.
        self.schedule = SparsitySchedule(schedule, target_sparsity, start_epoch, end_epoch)
        check_choice("fisher", fisher, ("empirical",))
        chosen = resolve_method(
            method,
            structure=structure,
            refine_passes=refine_passes,
            aux_lr=aux_lr,
            token_fraction=token_fraction,
        )
        self.options: PruningOptions = build_options(
            chosen,
            sparsity=target_sparsity,
            pattern=nm,
            scope=scope,
            steps=1,
            samples_per_step=samples_per_step,
            damping=damping,
            max_layer_sparsity=max_layer_sparsity,
            row_update=_row_update_default(chosen) if row_update is None else row_update,
            seed=seed,
            progress=False,
        )
        self.granularity = check_granularity(granularity, self.options)
        self.compact_on_train_end = bool(compact_on_train_end)
        if self.compact_on_train_end and self.granularity == UNSTRUCTURED:
            raise ValueError(
                "`compact_on_train_end=True` needs whole units to remove: set `granularity` to "
                "'neuron', 'channel' or 'head' (single weights cannot be cut out of a dense layer)."
            )
        self.target_sparsity = float(target_sparsity)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.aux_every_n_steps = check_positive_int("aux_every_n_steps", aux_every_n_steps)
        self.recompute_steps = check_positive_int("recompute_steps", recompute_steps)
        self.prune_every_n_steps = (
            None
            if prune_every_n_steps is None
            else check_positive_int("prune_every_n_steps", prune_every_n_steps)
        )
        self.log_layer_sparsity = log_layer_sparsity
        self.make_permanent = bool(make_permanent)
        self.verbose = bool(verbose)
        self.seed = int(seed)

        self.layers: dict[str, LayerAdapter] = {}
        self.engine: PruningEngine | None = None
        self.history: list[dict[str, float]] = []
        self._skipped_total = 0
        self._skipped_pending = 0
        self._world_size = 1
        self._record_examples: int | None = None  # examples in a record (this rank), once seen
        self._capture: GradientCapture | None = None
        self._buffer: list[dict[str, ExampleGradients]] = []
        self._buffer_batches: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._last_point = -math.inf
        self._optimizer_hooks: list[RemovableHandle] = []
        self._step_start = 0.0
        self._train_seconds = 0.0
        self._aux_seconds = 0.0
        self._units: StructuredUnits | None = None
        self._pending_units: dict[str, Tensor] | None = None
        self._unit_parameter_masks: dict[str, dict[str, Tensor]] = {}
        self._compacted = False
        self._cast_masks = CastMasks()

    # -- Lightning hooks ---------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """One pruning state per callback configuration in a checkpoint."""
        return self._generate_state_key(
            method=self.options.method_name, target_sparsity=self.target_sparsity
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the prunable layers and check the patterns and the schedule against them."""
        if stage != "fit":
            return
        if self._compacted:
            raise ValueError(
                "This FLSPruningCallback compacted its model at the end of an earlier fit "
                "(`compact_on_train_end=True`); its masks are for the model before. Use a new "
                "callback to fit again."
            )
        if self.compact_on_train_end and isinstance(
            getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher
        ):
            raise ValueError(
                "`compact_on_train_end=True` does not work with the spawned-process strategy "
                f"{type(trainer.strategy).__name__} ('ddp_spawn', 'ddp_fork', 'ddp_notebook'): "
                "Lightning copies the trained weights back into the main process's model, which "
                "keeps its full shapes. Use strategy='ddp', or call `lightning_fls.compact` "
                "after `fit`."
            )
        if isinstance(trainer.strategy, _SHARDED):
            raise ValueError(
                "FLSPruningCallback does not support the sharded strategy "
                f"{type(trainer.strategy).__name__} yet; use 'ddp' (or a single device)."
            )
        self.layers = prunable_layers(pl_module, self.include, self.exclude, trainable_only=True)
        self._world_size = max(1, int(trainer.world_size))
        max_epochs = trainer.max_epochs
        horizon = max_epochs if max_epochs is not None and max_epochs > 0 else self.end_epoch + 1
        self.schedule.check([float(t) for t in range(horizon + 1)])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the engine on the model's device, restore a checkpointed state, hook optimizers."""
        self.engine = PruningEngine(self.layers, self.options, model_device(pl_module))
        self._capture = GradientCapture(self.layers)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        self._apply_masks()
        for optimizer in trainer.optimizers:
            self._optimizer_hooks.append(
                optimizer.register_step_post_hook(lambda *_args, **_kw: self._apply_masks())
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Forget gradients recorded in earlier epochs (they predate the last pruning point)."""
        self._buffer.clear()
        self._buffer_batches.clear()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Attach the gradient capture on the steps that record curvature data."""
        self._step_start = time.perf_counter()
        if self.granularity != UNSTRUCTURED and self._units is None:
            self._find_units(pl_module, batch)
        if self._records(trainer, batch_idx):
            assert self._capture is not None
            self._capture.attach()
            self._buffer_batches = [*self._buffer_batches[-1:], batch]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Turn the captured activations and output gradients into per-example gradients."""
        capture = self._capture
        if capture is None or not capture.attached:
            return
        start = time.perf_counter()
        try:
            grads = capture.example_gradients(loss_reduction="mean", scale=_loss_scale(trainer))
        except RuntimeError:
            grads = None  # a layer took no part in this step's loss: skip the record
        capture.clear()
        if grads is not None and not all(bool(torch.isfinite(g.trace())) for g in grads.values()):
            self._skipped_pending += 1  # a non-finite gradient never reaches Q or the masks
            grads = None
        if grads is not None:
            self._record(grads)
        self._aux_seconds += time.perf_counter() - start

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Detach the capture; prune here when pruning by steps."""
        if self._capture is not None and self._capture.attached:
            self._capture.detach()
            self._capture.clear()
        self._train_seconds += time.perf_counter() - self._step_start
        every = self.prune_every_n_steps
        if every is not None and trainer.global_step % every == 0:
            progress = trainer.global_step / max(trainer.num_training_batches, 1)
            progress *= trainer.accumulate_grad_batches
            if self.schedule.is_pruning_point(progress):
                self._prune(trainer, pl_module, progress, on_step=True)
                self._buffer.clear()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reach the schedule's sparsity at the end of a pruning epoch."""
        progress = float(trainer.current_epoch + 1)
        if self.prune_every_n_steps is None and self.schedule.is_pruning_point(progress):
            self._prune(trainer, pl_module, progress, on_step=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the storage report (``make_permanent``); compact (``compact_on_train_end``)."""
        if self.engine is None:
            return
        if self.make_permanent:
            self._report_storage(trainer, pl_module)
        if self.compact_on_train_end:
            self._compact(trainer, pl_module)

    def _report_storage(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_masks()
        report = sparse_size_report(pl_module, list(self.layers))
        for logger in trainer.loggers:
            logger.log_metrics(
                {"fls/dense_mb": report.dense_mb, "fls/sparse_mb": report.sparse_mb},
                step=trainer.global_step,
            )
        if self.verbose:
            print(f"FLSPruningCallback: {report}")

    def _compact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Cut the removed units out of ``pl_module`` in place and log its new size."""
        units = self._units
        if units is None or not any(bool(flags.any()) for flags in units.removed):
            rank_zero_warn(
                "FLSPruningCallback: `compact_on_train_end` found no removed unit (training "
                "ended before the first pruning point); the model is left as it is."
            )
            return
        self._apply_masks()
        before = sum(p.numel() for p in pl_module.parameters())
        compact(pl_module, families=[layout.family for layout in units.layouts], inplace=True)
        after = sum(p.numel() for p in pl_module.parameters())
        self._compacted = True
        for logger in trainer.loggers:
            logger.log_metrics(
                {"fls/params": float(after), "fls/params_fraction": after / max(before, 1)},
                step=trainer.global_step,
            )
        if self.verbose:
            print(
                f"FLSPruningCallback: compacted the model from {before:,} to {after:,} "
                f"parameters ({after / max(before, 1):.1%})."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove every hook the callback attached (capture and optimizer hooks)."""
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks.clear()
        if self._capture is not None:
            self._capture.detach()
            self._capture.clear()
        self._buffer.clear()
        self._buffer_batches.clear()

    def _find_units(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """The structured units, found on the first training batch (its inputs trace the model)."""
        assert self.engine is not None
        # The model's positional input: a pair's first element (dict batches need none).
        inputs = None if isinstance(batch, Mapping) else batch
        if isinstance(batch, (tuple, list)):
            inputs = batch[0]
        self._units = structured_units(pl_module, self.layers, self.granularity, inputs)
        if self._pending_units is not None:
            flags = self._pending_units
            names = [layout.family.name for layout in self._units.layouts]
            if sorted(flags) != sorted(names):
                raise ValueError(
                    f"The checkpoint's removed units are for other families: {sorted(flags)}, "
                    f"the model has {names}."
                )
            self._units.removed = [flags[name].bool().cpu() for name in names]
            self._pending_units = None
        self._update_unit_masks()
        self._apply_masks()

    def _update_unit_masks(self) -> None:
        assert self.engine is not None
        assert self._units is not None
        self._unit_parameter_masks = {
            key: masks
            for key, masks in self.engine.unit_masks(self._units).items()
            if isinstance(masks, dict)
        }

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Versioned state: masks, schedule position, history, RNG state (tensors on CPU)."""
        if self.engine is None:
            return dict(self._pending_state or {})
        return {
            "version": STATE_VERSION,
            "method": self.options.method_name,
            "masks": {k: m.detach().cpu().clone() for k, m in self.engine.masks.items()},
            "last_point": self._last_point,
            "history": [dict(h) for h in self.history],
            "generator": self.engine.generator.get_state(),
            "skipped_records": self.skipped_records,
            "skipped_aux_updates": self.engine.skipped_aux_updates,
            "rollbacks": self.engine.rollbacks,
            "damping_scale": self.engine.damping_scale,
            "safeguard_reverts": self.engine.safeguard_reverts,
            "factorisation_fallbacks": self.engine.factorisation_fallbacks,
            **self._units_state(),
        }

    def _units_state(self) -> dict[str, Any]:
        if self._units is None:
            return {} if self._pending_units is None else {"units_removed": self._pending_units}
        flags = zip(self._units.layouts, self._units.removed, strict=True)
        return {"units_removed": {layout.family.name: r.clone() for layout, r in flags}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpointed state (older versions upgraded); applied when fitting starts.

        Raises:
            ValueError: If the state's version is unknown or a field is missing.
        """
        self._pending_state = upgrade_state(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.engine is not None
        masks: dict[str, Tensor] = state["masks"]
        missing = sorted(set(self.engine.masks) - set(masks))
        extra = sorted(set(masks) - set(self.engine.masks))
        if missing or extra:
            raise ValueError(
                "The checkpoint's pruning masks are for other layers: "
                f"missing {missing}, unexpected {extra}."
            )
        for key, mask in masks.items():
            expected = tuple(self.engine.masks[key].shape)
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"The checkpoint's mask for `{key}` has shape {tuple(mask.shape)}, the model's "
                    f"weight has {expected}."
                )
            self.engine.masks[key] = mask.to(self.engine.device, dtype=torch.bool)
        self._last_point = float(state["last_point"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.engine.generator.set_state(state["generator"])
        self._skipped_total, self._skipped_pending = int(state["skipped_records"]), 0
        self.engine.skipped_aux_updates = int(state["skipped_aux_updates"])
        self.engine.rollbacks = int(state["rollbacks"])
        self.engine.damping_scale = float(state["damping_scale"])
        self.engine.safeguard_reverts = int(state["safeguard_reverts"])
        self.engine.factorisation_fallbacks = int(state["factorisation_fallbacks"])
        removed = state.get("units_removed")
        if (removed is not None) != (self.granularity != UNSTRUCTURED):
            raise ValueError(
                f"The checkpoint was pruned {'by units' if removed else 'unstructured'}; this "
                f"callback has granularity={self.granularity!r}."
            )
        self._pending_units = None if removed is None else dict(removed)

    # -- internals -----------------------------------------------------------------------------

    @property
    def skipped_records(self) -> int:
        """Recorded batches skipped because a per-example gradient was not finite (all ranks)."""
        return self._skipped_total + self._skipped_pending

    @property
    def masks(self) -> dict[str, Tensor]:
        """Current masks (``True`` = kept) by weight name; empty before fitting starts."""
        return {} if self.engine is None else dict(self.engine.masks)

    def _records(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether this batch's gradients are recorded for the next pruning point."""
        if self.options.method.calibration == "none" or batch_idx % self.aux_every_n_steps != 0:
            return False
        if self.prune_every_n_steps is not None:
            return True
        if not self.schedule.is_pruning_point(float(trainer.current_epoch + 1)):
            return False
        return self._among_newest(trainer, batch_idx)

    def _among_newest(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether a record of this batch can be among those kept at the end of the epoch.

        Only the newest records holding ``samples_per_step`` examples reach the pruning point,
        so once the examples per record are known (from this run's first record) and the epoch's
        length is known, the earlier batches of the epoch are not recorded at all: the records
        they would have given are dropped anyway. One record more than needed is taken, in case
        the epoch's last batch is short. Unknown lengths (an iterable dataset) record every
        ``aux_every_n_steps``-th batch.
        """
        total = trainer.num_training_batches
        if self._record_examples is None or not math.isfinite(total):
            return True
        every = self.aux_every_n_steps
        per_record = self._record_examples * self._world_size
        needed = -(-self.options.samples_per_step // per_record) + 1
        last = (int(total) - 1) // every * every  # the epoch's last recorded batch index
        return batch_idx > last - needed * every

    def _record(self, grads: dict[str, ExampleGradients]) -> None:
        """Keep the newest batches holding ``samples_per_step`` examples over all ranks."""
        self._buffer.append(grads)
        self._record_examples = next(iter(grads.values())).batch_size
        kept = 0
        for index in range(len(self._buffer) - 1, -1, -1):
            kept += next(iter(self._buffer[index].values())).batch_size
            if kept * self._world_size >= self.options.samples_per_step:
                del self._buffer[:index]
                break

    def _apply_masks(self) -> None:
        if self.engine is None or self._compacted:
            return
        self._cast_masks.apply_(
            {key: weight_of(adapter) for key, adapter in self.layers.items()},
            self.engine.masks,
        )
        for key, masks in self._unit_parameter_masks.items():  # removed units' biases
            adapter = self.layers[key]
            self._cast_masks.apply_(
                {f"{key}/{name}": getattr(adapter.module, name) for name in masks},
                {f"{key}/{n}": m for n, m in masks.items() if n != adapter.key_parameter},
            )

    def _prune(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, progress: float, on_step: bool
    ) -> None:
        engine = self.engine
        if engine is None or progress <= self._last_point:
            return
        target = self.schedule(progress)
        units = self._units
        if units is None:
            current, count = sparsity_of(engine.masks), _total(engine.masks)
        else:
            current, count = units.fraction_removed(), sum(lay.units for lay in units.layouts)
        if target <= current + 0.5 / max(1, count):
            self._last_point = progress
            return
        start = time.perf_counter()
        # Under DDP: every rank's records (a collective), so every rank decides alike.
        self._skipped_total += sum_across_ranks(self._skipped_pending, engine.device)
        self._skipped_pending = 0
        step = self._step_data(engine.device)
        if self.options.method.calibration != "none" and step is None:
            rank_zero_warn(
                f"FLSPruningCallback: no usable gradients were recorded before the pruning point "
                f"at epoch {progress:g} ({self.skipped_records} non-finite record(s) skipped so "
                f"far); pruning waits for the next point. Lower `aux_every_n_steps` "
                f"({self.aux_every_n_steps}) or check that the training step runs a backward."
            )
            return
        before = self._evaluate(trainer, pl_module)
        predicted, gamma, aux = 0.0, 0.0, None
        estimate_seconds = obs_seconds = 0.0
        for index, sub_target in enumerate(linear_steps(current, target, self.recompute_steps)):
            phase = time.perf_counter()
            curvature, _, gamma, _ = engine.curvature(step)
            estimate_seconds += time.perf_counter() - phase
            if index == 0 and step is not None:
                aux = engine.aux_loss(step, gamma)
            evaluate = functools.partial(self._evaluate, trainer, pl_module)
            phase = time.perf_counter()
            if units is not None:
                outcome = engine.structured_step(curvature, sub_target, units, evaluate)
            else:
                outcome = engine.prune_step(curvature, sub_target, evaluate)
            obs_seconds += time.perf_counter() - phase
            predicted += outcome.predicted
        self._synchronise(trainer)
        if units is not None:
            self._update_unit_masks()
        self._apply_masks()
        after = self._evaluate(trainer, pl_module)
        seconds = time.perf_counter() - start
        self._aux_seconds += seconds
        self._train_seconds += seconds
        self._last_point = progress
        metrics = {
            "fls/sparsity": sparsity_of(engine.masks),
            "fls/target_sparsity": target,
            "fls/predicted_loss_increase": predicted,
            "fls/damping": gamma,
            "fls/prune_seconds": seconds,
            "fls/estimate_seconds": estimate_seconds,
            "fls/obs_seconds": obs_seconds,
            "fls/aux_time_fraction": self._aux_seconds / max(self._train_seconds, 1e-12),
            "fls/callback_seconds": self._aux_seconds,
            "fls/skipped_records": float(self.skipped_records),
            "fls/skipped_aux_updates": float(engine.skipped_aux_updates),
            "fls/rollbacks": float(engine.rollbacks),
            "fls/safeguard_reverts": float(engine.safeguard_reverts),
            "fls/factorisation_fallbacks": float(engine.factorisation_fallbacks),
        }
        if aux is not None:
            metrics["fls/aux_loss"] = aux
        if units is not None:
            metrics["fls/units_removed"] = units.fraction_removed()
        if before is not None and after is not None:
            metrics["fls/realised_loss_increase"] = after - before
        if self._logs_layers():
            for key, value in layer_sparsities(engine.masks).items():
                metrics[f"fls/sparsity/{key}"] = value
        self.history.append({"epoch": progress, **metrics})
        for name, value in metrics.items():
            # Under DDP the values agree on every rank except the realised loss (each rank's
            # own batches) and the timings: their means across ranks are logged.
            pl_module.log(
                name, value, on_step=on_step, on_epoch=not on_step, sync_dist=self._world_size > 1
            )
        if self.verbose:
            realised = metrics.get("fls/realised_loss_increase")
            print(
                f"FLSPruningCallback[{self.options.method_name}] epoch {progress:g}: sparsity "
                f"{metrics['fls/sparsity']:.4f} (target {target:.4f}), predicted loss increase "
                f"{predicted:.4g}"
                + ("" if realised is None else f", realised {realised:.4g}")
                + f", {seconds:.1f} s"
            )

    def _synchronise(self, trainer: pl.Trainer) -> None:
        """Under DDP, give every rank rank 0's masks and pruned weights (bit-identical)."""
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        assert self.engine is not None
        for key, adapter in self.layers.items():
            mask = self.engine.masks[key].to(torch.uint8)
            torch.distributed.broadcast(mask, src=0)
            self.engine.masks[key] = mask.bool()
            for name in adapter.parameter_names:  # OBS also corrects the layer's bias
                torch.distributed.broadcast(getattr(adapter.module, name).data, src=0)
        if self._units is not None:
            for index, flags in enumerate(self._units.removed):
                shared = flags.to(self.engine.device, torch.uint8)
                torch.distributed.broadcast(shared, src=0)
                self._units.removed[index] = shared.bool().cpu()

    def _step_data(self, device: torch.device) -> StepData | None:
        if self.options.method.calibration == "none":
            return None
        batches = gather_records(self._buffer, device)
        if not batches:
            return None
        samples = sum(next(iter(g.values())).batch_size for g in batches)
        return StepData(batches=batches, samples=samples)

    def _logs_layers(self) -> bool:
        if self.log_layer_sparsity is None:
            return len(self.layers) <= _LAYER_LOG_LIMIT
        return self.log_layer_sparsity

    @torch.no_grad()
    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """Mean training loss on the last recorded batches (eval mode), or None if unavailable.

        Calls the module's own ``training_step`` with logging muted; skipped for manual
        optimization (whose training step steps the optimizers) and without recorded batches.
        Under DDP it is the mean over the ranks (a collective), so that every rank takes the
        same safeguard decisions.
        """
        if not self._buffer_batches or not pl_module.automatic_optimization:
            return None
        was_training = pl_module.training
        pl_module.eval()
        losses = []
        try:
            with _muted_logging(pl_module), trainer.precision_plugin.forward_context():
                for index, batch in enumerate(self._buffer_batches):
                    output = pl_module.training_step(batch, index)
                    loss = output.get("loss") if isinstance(output, dict) else output
                    if isinstance(loss, Tensor) and loss.dim() == 0:
                        losses.append(float(loss.float()))
        finally:
            pl_module.train(was_training)
        if not losses:
            return None
        return mean_across_ranks(sum(losses) / len(losses), model_device(pl_module))


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpointed callback state in the current version's layout.

    Version 1 (lightning_fls 0.1.0.dev0 before the fault counters) is upgraded: no aux update
    skipped, no rollback, damping scale 1. Versions 1 and 2 get no safeguard revert and no
    factorisation fallback.

    Args:
        state: What :meth:`FLSPruningCallback.state_dict` returned in some version.

    Returns:
        A new dictionary in version :data:`STATE_VERSION`.

    Raises:
        ValueError: If the version is unknown or a required field is missing.
    """
    version = state.get("version")
    if version not in (1, 2, STATE_VERSION):
        raise ValueError(
            f"FLSPruningCallback state version {version!r} is not supported: this version of "
            f"lightning_fls reads versions 1 to {STATE_VERSION}."
        )
    upgraded = dict(state)
    if version == 1:
        upgraded.setdefault("skipped_records", 0)
        upgraded.update(skipped_aux_updates=0, rollbacks=0, damping_scale=1.0)
    if version in (1, 2):
        upgraded.update(safeguard_reverts=0, factorisation_fallbacks=0)
        upgraded["version"] = STATE_VERSION
    missing = sorted(
        name
        for name in ("masks", "last_point", "generator", "skipped_records", "damping_scale")
        if name not in upgraded
    )
    if missing:
        raise ValueError(f"The checkpointed FLSPruningCallback state lacks {missing}.")
    return upgraded


CALLBACK_ROW_UPDATE = "refined_sweep"
"""The callback's default ``row_update`` (fine-tuning follows every pruning point there)."""


def _row_update_default(method: PruningMethod) -> str | None:
    """:data:`CALLBACK_ROW_UPDATE` where the method's joint update is on by default, else None."""
    return CALLBACK_ROW_UPDATE if method.default_joint else None


def _total(masks: dict[str, Tensor]) -> int:
    return sum(m.numel() for m in masks.values())


def _loss_scale(trainer: pl.Trainer) -> float:
    """Factor that turns the captured output gradients back into those of the batch-mean loss."""
    factor = 1.0
    if trainer.lightning_module.automatic_optimization:
        factor *= trainer.accumulate_grad_batches
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        factor /= float(scaler.get_scale())
    return factor


@contextmanager
def _muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Temporarily turn ``self.log``/``self.log_dict`` into no-ops."""

    def silent(*_args: Any, **_kwargs: Any) -> None:
        return None

    saved: dict[str, Callable[..., Any]] = {}
    for name in ("log", "log_dict"):
        saved[name] = getattr(pl_module, name)
        setattr(pl_module, name, silent)
    try:
        yield
    finally:
        for name in saved:
            delattr(pl_module, name)


METHODS = BUILTIN_METHODS
"""The built-in method names."""

__all__ = ["METHODS", "STATE_VERSION", "FLSPruningCallback", "upgrade_state"]
