"""One-shot pruning of a trained model: :func:`prune_one_shot`.

Every method shares the same masks and OBS code (:mod:`lightning_fls.masks`,
:mod:`lightning_fls.obs`) and differs only in its inverse-curvature estimate ``Q ≈ (F + γI)⁻¹``
and the calibration it reads (:mod:`lightning_fls.methods`):

==============  ===========================================================================
``fls``         FishLeg Surgeon with Kronecker-factored Q per layer: each step starts from the
                K-FAC statistics of the current weights (input covariance over every example,
                or half of each sequence's tokens drawn per batch, output-gradient
                covariance), optionally refined with auxiliary
                steps; joint OBS inside each row. With a block-diagonal ``structure``
                (B = 50) each step starts at the auxiliary loss's exact minimiser,
                ``(F_j + γI)⁻¹`` per block from per-example gradients, and OBS is joint
                inside blocks
``kfac``        the same Kronecker Q with the sum of single OBS updates (``joint=False``
                by default): the K-FAC OBS baseline
``obert``       oBERT / WoodFisher block-50 Woodbury inverse of the empirical Fisher
``mfac``        static M-FAC (matrix-free, blocks of 2000)
``diag_fisher`` diagonal Fisher OBS
``sparsegpt``   SparseGPT: each layer pruned by a column sweep of OBS steps on the layer-wise
                reconstruction loss, ``H = Σ x xᵀ`` streamed forward-only (1% dampening)
``wanda``       Wanda: the least ``|w|·‖x‖`` go, forward-only, no correction
``magnitude``   ``Q = I``: global magnitude pruning, no data
==============  ===========================================================================

Methods registered with :func:`~lightning_fls.register_method` are accepted by name too.

Pruning proceeds in ``steps`` recomputation steps of rising sparsity (the density shrinks
geometrically to ``1 − sparsity``, :func:`~lightning_fls.schedules.geometric_steps`); at each
step the curvature is (re-)estimated from ``samples_per_step`` fresh examples, the least salient
weights (``ρ = w²/(2[Q]_qq)``) are pruned and the survivors corrected by OBS. Every method sees
the same examples.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_fls._memory import PeakMemory
from lightning_fls._validation import check_patterns
from lightning_fls.batches import Batch, LossFn, make_batch
from lightning_fls.calibration import (
    Collector,
    GradientCollector,
    GradientStream,
    InputCollector,
    StepData,
)
from lightning_fls.engine import (
    PruningEngine,
    model_device,
    weight_of,
)
from lightning_fls.fishleg import Likelihood, StructurePolicy
from lightning_fls.layer_groups import check_budget, default_budget_mb, plan_groups
from lightning_fls.layers import LayerAdapter, prunable_layers
from lightning_fls.masks import Scope
from lightning_fls.methods import BUILTIN_METHODS, PruningMethod, resolve_method
from lightning_fls.options import FisherKind, PruningOptions, build_options, scale_defaults
from lightning_fls.safeguard import StepOutcome, load, snapshot
from lightning_fls.schedules import geometric_steps
from lightning_fls.structured.saliency import StructuredUnits
from lightning_fls.structured.setup import UNSTRUCTURED, check_granularity, structured_units

METHODS = BUILTIN_METHODS
"""The built-in method names (:func:`~lightning_fls.methods.method_names` also lists registered
ones)."""

__all__ = ["METHODS", "PruningReport", "prune_one_shot"]


@dataclass
class PruningReport:
    """What :func:`prune_one_shot` did.

    Attributes:
        method: The method used.
        target_sparsity: The sparsity asked for.
        sparsity: Achieved fraction of zero weights over the pruned parameters.
        layer_sparsity: Achieved sparsity per pruned parameter (fully-qualified name).
        predicted_loss_increase: ``Σ ρ`` of the pruned weights over all steps (OBS's local
            prediction of the loss increase; for magnitude it is ``Σ w²/2``, not a loss).
        steps: Recomputation steps taken.
        samples: Examples used for curvature work.
        damping: γ of the last step (absolute, in Fisher units); 0 when unused.
        curvature_seconds: Wall time spent on curvature work (gradients, estimates, OBS).
        curvature_state_mb: Largest memory held by the curvature estimate itself.
        peak_memory_mb: Peak memory growth during the curvature work (CUDA allocator, or process
            RSS on Linux); None where it cannot be measured.
        realised_loss_increase: The measured increase of the loss on each step's calibration
            batches, summed over steps (compare with ``predicted_loss_increase``); None for
            magnitude, which records no batches.
        safeguard_reverts: Layer corrections undone because they did worse than zeroing the
            pruned weights alone (:mod:`lightning_fls.safeguard`; each also raised a warning).
        factorisation_fallbacks: Matrices whose float64 Cholesky factorisation failed and that
            went through an eigenvalue floor instead (each also raised a warning); 0 on
            well-posed data.
        layer_groups: Groups of layers whose estimates were built one group at a time
            (``memory_budget_mb``); 1: all at once.
        granularity: What was removed: ``"unstructured"`` (single weights), ``"neuron"``,
            ``"channel"`` or ``"head"``.
        units_removed: With whole units, the fraction of units removed (``sparsity`` then
            counts the weights they held); None for unstructured pruning.
        masks: Final boolean masks (``True`` = kept) by parameter name.
    """

    method: str
    target_sparsity: float
    sparsity: float
    layer_sparsity: dict[str, float]
    predicted_loss_increase: float
    steps: int
    samples: int
    damping: float
    curvature_seconds: float
    curvature_state_mb: float
    peak_memory_mb: float | None
    realised_loss_increase: float | None = None
    safeguard_reverts: int = 0
    factorisation_fallbacks: int = 0
    layer_groups: int = 1
    granularity: str = "unstructured"
    units_removed: float | None = None
    masks: dict[str, Tensor] = field(repr=False, default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: sparsity {self.sparsity:.4f} (target {self.target_sparsity:.4f}), "
            f"{self.steps} step(s), {self.samples} samples, "
            f"predicted loss increase {self.predicted_loss_increase:.4g}"
            + (
                ""
                if self.realised_loss_increase is None
                else f" (realised {self.realised_loss_increase:.4g})"
            )
            + ", "
            f"curvature {self.curvature_seconds:.2f} s, state {self.curvature_state_mb:.1f} MB",
        ]
        lines += [f"  {name}: {value:.4f}" for name, value in self.layer_sparsity.items()]
        return "\n".join(lines)


def prune_one_shot(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    sparsity: float,
    method: str | PruningMethod = "fls",
    pattern: str | None = None,
    scope: Scope | None = None,
    steps: int | None = None,
    samples_per_step: int | None = None,
    fisher: FisherKind = "empirical",
    likelihood: str | Likelihood | None = None,
    damping: float | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_layer_sparsity: float | None = None,
    structure: StructurePolicy | None = None,
    refine_passes: int | None = None,
    reestimate: bool | None = None,
    aux_lr: float | None = None,
    token_fraction: float | None = None,
    gradient_batch_size: int | None = None,
    block_size: int | None = None,
    joint: bool | None = None,
    row_update: str | None = None,
    memory_budget_mb: float | None = None,
    granularity: str = "unstructured",
    seed: int = 0,
    progress: bool = True,
) -> PruningReport:
    """Prune a trained model in place to ``sparsity``, with FLS or a baseline, no fine-tuning.

    The weights of every Linear and Conv2d layer (and any type registered with
    :func:`~lightning_fls.register_layer`) are pruned; biases, norms and embeddings are
    not. Weights that are already exactly zero count as pruned. The model keeps its device,
    train/eval mode and ``requires_grad`` flags; parameters' ``.grad`` are not touched (the
    curvature work runs in eval mode). On any error the model is left as it was.

    Args:
        model: The trained model.
        dataloader: Yields ``(inputs, targets)`` pairs, or dicts of keyword arguments (a
            Hugging Face tokenizer's output, with ``labels`` for the model's own loss:
            :mod:`lightning_fls.batches`); cycled if it runs out. A dict's ``attention_mask``
            keeps padding out of every statistic.
        loss_fn: ``loss_fn(model(inputs), targets)`` for pairs, ``loss_fn(model(**batch),
            batch)`` for dicts: a scalar **mean** over the batch. None (dicts only): the
            model's own ``outputs.loss``.
        sparsity: Target fraction of pruned weights in ``[0, 1)``; 0 is a no-op.
        method: A registered name: ``"fls"`` (default), ``"kfac"``, ``"obert"``, ``"mfac"``,
            ``"diag_fisher"``, ``"sparsegpt"``, ``"wanda"``, ``"magnitude"`` or one added with
            :func:`~lightning_fls.register_method`; or a
            :class:`~lightning_fls.methods.PruningMethod` instance carrying its own options.
        pattern: ``None`` (unstructured) or ``"N:M"``, e.g. ``"2:4"``: N of every M consecutive
            weights of a row pruned (:mod:`lightning_fls.patterns`), chosen and corrected by
            the group form of OBS; ``sparsity`` must then be at most ``N/M`` (exactly ``N/M``
            for the full pattern).
        scope: ``"global"`` (one ranking over all layers) or ``"layer"`` (the same sparsity in
            each layer); default: the method's (``"global"``; ``"layer"`` for ``sparsegpt``,
            the only scope it accepts, and ``wanda``).
        steps: Recomputation steps (default: the method's; 16, and 1 for ``magnitude``,
            ``sparsegpt`` and ``wanda``). On a model with more than 4 M pruned weights, methods
            that read gradients default to their large-model budget
            (:func:`~lightning_fls.options.scale_defaults`): 1 step for ``fls`` and ``kfac``
            (Kronecker Q), 1 up to 50% sparsity and 2 above for the others.
        samples_per_step: Examples used for the curvature estimate at each step (rounded up to
            whole batches); the same for every method (``magnitude`` reads none). Default
            1024, also on a large model for ``fls`` and ``kfac``; 256 for the other methods
            that read gradients on a model with more than 4 M pruned weights.
        fisher: ``"empirical"`` (data labels) or ``"sampled"`` (labels drawn from the model,
            i.e. the true Fisher; needs ``likelihood``; methods that read gradients only).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or a
            :class:`~lightning_fls.fishleg.Likelihood`, for ``fisher="sampled"``.
        damping: γ relative to the mean of ``diag F`` over the pruned layers (> 0; default
            1e-2); an error for methods that use no Fisher damping (``sparsegpt``, ``wanda``,
            ``magnitude``).
        include: Glob patterns of parameter names to prune (default: every layer weight; in a
            model with attention, the layers inside its transformer blocks). An entry that is
            exactly a norm's or an embedding's weight name prunes it too.
        exclude: Glob patterns of parameter names not to prune.
        max_layer_sparsity: Optional cap on any layer's sparsity (global scope).
        structure: ``fls``/``kfac`` only: block structure policy (default: Kronecker for
            both; ``StructurePolicy("block_diagonal")`` for FLS's block-diagonal Q, B = 50).
        refine_passes: ``fls`` only: auxiliary-loss passes over each step's batches after the
            statistics-based start (>= 0; 0 by default; for block-diagonal Q that start is
            already the auxiliary loss's exact minimiser for the step's data).
        reestimate: ``fls`` only: restart Q from the step's statistics before refining it
            (True), or keep refining the previous step's Q (False, the FLS paper's "refinement
            instead of re-estimation").
        aux_lr: ``fls`` only: learning rate of the auxiliary fit.
        token_fraction: ``fls``/``kfac`` only: fraction of each example's positions (tokens,
            conv output pixels) whose outer products enter the Kronecker statistics, in
            ``(0, 1]`` (default 0.5); a fresh uniform draw per batch, the sums scaled to stay
            unbiased. Layers with one position per example keep every example.
        gradient_batch_size: ``obert``/``mfac``: examples per gradient (``m`` = samples / this).
        block_size: ``obert``/``mfac``: block size (defaults 50 and 2000, as published).
        joint: Joint OBS inside blocks where Q has explicit blocks, instead of the sum of
            single updates; for a Kronecker Q, joint OBS inside each row (the output side
            taken as diagonal: :func:`~lightning_fls.obs.kronecker_row_obs_update`).
            Default: on for ``fls``, off for ``obert`` (its published unstructured update) and
            ``kfac``; ignored where Q has no explicit blocks.
        row_update: With ``joint``, how the update inside each row of a Kronecker Q is
            solved: ``"joint"`` exactly, one factorisation per row of side up to half the row
            (:func:`~lightning_fls.obs.kronecker_row_obs_update`); ``"sweep"`` by SparseGPT's
            column sweep, one factorisation per layer but a correction that never reaches
            columns left of a removed weight
            (:func:`~lightning_fls.obs.kronecker_sweep_obs_update`); ``"refined_sweep"``: the
            sweep, then 10 conjugate-gradient steps towards the joint update (the
            :class:`~lightning_fls.FLSPruningCallback`'s default); ``"auto"`` (the default):
            per layer, exactly unless that costs more than 4× the refined sweep's arithmetic,
            as for rows thousands of inputs wide at moderate sparsity
            (:func:`~lightning_fls.obs.kronecker_auto_obs_update`). An error where ``joint`` is
            off or does not apply.
        memory_budget_mb: Most memory, in MB, that one group of layers' curvature statistics
            and estimates may hold, for methods that can work in layer groups (``fls`` and
            ``kfac`` without auxiliary refinement, ``obert``, ``mfac``, ``diag_fisher``): the
            layers are then processed in
            consecutive groups within it (:mod:`lightning_fls.layer_groups`; same result, a
            second calibration pass per group but the last). Default: twice the largest
            layer's statistics, at least 512 MB; one group when everything fits.
        granularity: What is removed: ``"unstructured"`` (single weights, the default), or
            whole units with everything coupled to them (:mod:`lightning_fls.structured`):
            ``"neuron"`` (a Linear layer's output neurons with the matching input columns of
            the layers reading them), ``"channel"`` (a Conv2d layer's output channels, with
            batch-norm and the next layer's input channels) or ``"head"`` (attention heads).
            ``sparsity`` is then the fraction of units removed over every layer whose units
            can be removed; each such layer keeps at least one. Units are chosen by the group
            OBS cost ``½ w_Sᵀ ([Q]_SS)⁻¹ w_S`` and the survivors corrected jointly
            (``method="kfac"`` measured best for neurons and channels, block-diagonal ``fls``
            for heads: ``docs/structured.md``); the pruned model keeps its shapes, with the
            removed units' weights and biases at zero, and :func:`~lightning_fls.compact`
            cuts them out. Not with ``pattern``,
            ``scope="layer"``, ``memory_budget_mb`` or ``sparsegpt``.
        seed: Seed of the random probes and sampled labels.
        progress: Show a progress bar.

    Returns:
        A :class:`PruningReport`.

    Method-specific options (``structure`` … ``block_size``) are passed to the method; one
    that the chosen method does not have is an error naming the method and its options.

    Raises:
        ValueError: For an invalid argument, an option that does not apply to the method, no
            prunable layer, an empty loader, or a loss that is not a finite scalar.
        TypeError: If a batch is neither an ``(inputs, targets)`` pair nor a dict.
    """
    chosen = resolve_method(
        method,
        structure=structure,
        refine_passes=refine_passes,
        reestimate=reestimate,
        aux_lr=aux_lr,
        token_fraction=token_fraction,
        gradient_batch_size=gradient_batch_size,
        block_size=block_size,
    )
    options = build_options(
        chosen,
        sparsity=sparsity,
        pattern=pattern,
        scope=scope,
        steps=steps,
        samples_per_step=samples_per_step,
        fisher=fisher,
        likelihood=likelihood,
        damping=damping,
        max_layer_sparsity=max_layer_sparsity,
        joint=joint,
        row_update=row_update,
        seed=seed,
        progress=progress,
    )
    budget = check_budget(memory_budget_mb)
    layers = prunable_layers(
        model, check_patterns("include", include), check_patterns("exclude", exclude)
    )
    weights = sum(weight_of(adapter).numel() for adapter in layers.values())
    options = scale_defaults(
        options, weights, sparsity=sparsity, steps=steps, samples_per_step=samples_per_step
    )
    batches = _BatchStream(dataloader, model_device(model), loss_fn)
    units = None
    if check_granularity(granularity, options, memory_budget_mb=budget) != UNSTRUCTURED:
        first = batches.peek()
        units = structured_units(
            model, layers, granularity, None if first.keywords else first.inputs
        )
        units.check_reachable(sparsity, options.max_layer_sparsity)
    if sparsity == 0.0:
        return _report(options, sparsity, layers, {}, 0.0, 0, 0, 0.0, 0.0, 0.0, None)

    backup = snapshot(layers)  # in a temporary file: not a second copy of the model in memory
    training = model.training
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()
        for adapter in layers.values():
            for name in adapter.parameter_names:
                getattr(adapter.module, name).requires_grad_(True)
        return _Pruner(model, loss_fn, layers, batches, options, budget, units).run(sparsity)
    except BaseException:
        for key, adapter in layers.items():
            load(adapter, backup[key])
        raise
    finally:
        backup.close()
        model.train(training)
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])


class _BatchStream:
    """Cycles over a dataloader, checks batches and moves them to the model's device."""

    def __init__(
        self, dataloader: Iterable[Any], device: torch.device, loss_fn: LossFn | None
    ) -> None:
        self.dataloader = dataloader
        self.device = device
        self.loss_fn = loss_fn
        self._iterator: Iterator[Any] = iter(dataloader)
        try:
            first = next(self._iterator)
        except StopIteration:
            raise ValueError("`dataloader` is empty.") from None
        # Made (checked and moved) here, so that a malformed batch fails up front.
        self._first: Batch | None = make_batch(first, device, loss_fn=loss_fn)

    def peek(self) -> Batch:
        """The first batch (made and checked), without consuming it."""
        if self._first is None:
            raise RuntimeError("The first batch was already consumed.")
        return self._first

    def next(self) -> Batch:
        if self._first is not None:
            made, self._first = self._first, None
            return made
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.dataloader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError("`dataloader` is empty.") from None
        return make_batch(batch, self.device, loss_fn=self.loss_fn)


class _Pruner:
    """Runs the recomputation steps for one call of :func:`prune_one_shot`."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        layers: dict[str, LayerAdapter],
        batches: _BatchStream,
        options: PruningOptions,
        memory_budget_mb: float | None = None,
        units: StructuredUnits | None = None,
    ) -> None:
        self.model = model
        self.units = units
        self.loss_fn = loss_fn
        self.layers = layers
        self.batches = batches
        self.options = options
        self.device = batches.device
        self.generator = torch.Generator().manual_seed(options.seed)
        self.engine = PruningEngine(layers, options, self.device)
        self.groups = [list(layers)]
        layer_bytes = self.engine.method.layer_group_bytes(self.engine)
        if layer_bytes is None and memory_budget_mb is not None:
            raise ValueError(
                f"`memory_budget_mb` does not apply to method={options.method_name!r}: it builds "
                "every layer's estimate at once. Layer groups need a method whose estimates "
                "come from streamed statistics alone (fls and kfac without `refine_passes`, obert, "
                "mfac, diag_fisher)."
            )
        if layer_bytes is not None and units is None:
            budget = memory_budget_mb or default_budget_mb(layer_bytes)
            self.groups = plan_groups(layer_bytes, budget)

    def run(self, sparsity: float) -> PruningReport:
        opts = self.options
        predicted, samples, state_mb, gamma = 0.0, 0, 0.0, 0.0
        realised: float | None = None
        bar = tqdm(
            total=opts.steps, desc=f"prune_one_shot[{opts.method_name}]", disable=not opts.progress
        )
        start = time.perf_counter()
        with PeakMemory(self.device) as memory:
            for target in geometric_steps(sparsity, opts.steps):
                if len(self.groups) > 1:
                    outcome, step_samples, gamma, step_mb = self._grouped_step(target)
                else:
                    step, batches = self._calibrate()
                    curvature, step_samples, gamma, step_mb = self.engine.curvature(step)
                    probe = functools.partial(self._loss, batches) if batches else None
                    if self.units is not None:
                        outcome = self.engine.structured_step(curvature, target, self.units, probe)
                    else:
                        outcome = self.engine.prune_step(curvature, target, probe)
                    del curvature, step
                samples += step_samples
                state_mb = max(state_mb, step_mb)
                predicted += outcome.predicted
                if outcome.realised is not None:
                    realised = (realised or 0.0) + outcome.realised
                bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        report = _report(
            opts, sparsity, self.layers, self.engine.masks, predicted, opts.steps, samples, gamma,
            seconds, state_mb, memory.peak_mb, self.engine, realised,
        )  # fmt: skip
        report.layer_groups = len(self.groups)
        if self.units is not None:
            report.granularity = self.units.layouts[0].family.granularity
            report.units_removed = self.units.fraction_removed()
        return report

    def _grouped_step(self, target: float) -> tuple[StepOutcome, int, float, float]:
        """One step in layer groups (:meth:`PruningEngine.grouped_step`).

        The first pass draws the step's batches and keeps them; every later pass replays them
        with the sampled labels' generator reset to the step's start, so each group sees the
        data the one-group run would.
        """
        batches: list[tuple[Batch, int]] = []
        start = self.generator.get_state()
        end = start

        def collect(stream: GradientStream | None, i: int, first: bool) -> StepData:
            nonlocal end
            self.generator.set_state(start)
            group = self.layers if first else {k: self.layers[k] for k in self.groups[i]}
            collector = self._gradient_collector(group, stream)
            if first:
                while collector.samples < self.options.samples_per_step:
                    batch = self.batches.next()
                    batches.append((batch, collector.observe(batch)))
                end = self.generator.get_state()
            else:
                for batch, _ in batches:
                    collector.observe(batch)
            return collector.result()

        probe = functools.partial(self._loss, batches)
        result = self.engine.grouped_step(collect, self.groups, target, probe)
        self.generator.set_state(end)
        return result

    def _collector(self) -> Collector | None:
        """The collector of the method's calibration (None: it reads no data)."""
        calibration = self.engine.method.calibration
        if calibration == "none":
            return None
        if calibration == "inputs":
            return InputCollector(
                self.model, self.loss_fn, self.layers, method=self.options.method_name
            )
        return self._gradient_collector(self.layers, self.engine.method.stream(self.engine))

    def _gradient_collector(
        self, layers: Mapping[str, LayerAdapter], stream: GradientStream | None
    ) -> GradientCollector:
        return GradientCollector(
            self.model,
            self.loss_fn,
            layers,
            likelihood=self.options.likelihood,
            generator=self.generator,
            stream=stream,
        )

    def _calibrate(self) -> tuple[StepData | None, list[tuple[Batch, int]]]:
        """One step's calibration data from enough batches for ``samples_per_step`` examples.

        Returns:
            The data (None for a method that reads none), and the batches they came from
            (``(batch, size)``).
        """
        collector = self._collector()
        if collector is None:
            return None, []
        batches: list[tuple[Batch, int]] = []
        while collector.samples < self.options.samples_per_step:
            batch = self.batches.next()
            size = collector.observe(batch)
            batches.append((batch, size))
        return collector.result(), batches

    @torch.no_grad()
    def _loss(self, batches: list[tuple[Batch, int]]) -> float:
        """The mean loss over the step's calibration batches, with the current weights."""
        total = sum(
            float(batch.loss(batch.forward(self.model), self.loss_fn)) * size
            for batch, size in batches
        )
        return total / sum(size for _, size in batches)


def _report(
    options: PruningOptions,
    target: float,
    layers: Mapping[str, LayerAdapter],
    masks: Mapping[str, Tensor],
    predicted: float,
    steps: int,
    samples: int,
    damping: float,
    seconds: float,
    state_mb: float,
    peak_mb: float | None,
    engine: PruningEngine | None = None,
    realised: float | None = None,
) -> PruningReport:
    zeros = {key: int((weight_of(a) == 0).sum()) for key, a in layers.items()}
    sizes = {key: weight_of(a).numel() for key, a in layers.items()}
    return PruningReport(
        method=options.method_name,
        target_sparsity=float(target),
        sparsity=sum(zeros.values()) / sum(sizes.values()),
        layer_sparsity={key: zeros[key] / sizes[key] for key in layers},
        predicted_loss_increase=predicted,
        steps=steps,
        samples=samples,
        damping=damping,
        curvature_seconds=seconds,
        curvature_state_mb=state_mb,
        peak_memory_mb=peak_mb,
        realised_loss_increase=realised,
        safeguard_reverts=0 if engine is None else engine.safeguard_reverts,
        factorisation_fallbacks=0 if engine is None else engine.factorisation_fallbacks,
        masks={key: m.clone() for key, m in masks.items()},
    )
