"""One-shot pruning of a trained model: :func:`prune_one_shot`.

Every method shares the same masks and OBS code (:mod:`lightning_fls.masks`,
:mod:`lightning_fls.obs`) and differs only in its inverse-curvature estimate ``Q ≈ (F + γI)⁻¹``:

==============  ===========================================================================
``fls``         FishLeg Surgeon with block-diagonal Q (B = 50): each step starts at the exact
                minimiser of the FishLeg auxiliary loss for that structure, ``(F_j + γI)⁻¹``
                per block from per-example gradients restricted to surviving weights, then
                optionally refines it with auxiliary steps; joint OBS inside blocks
``kfac``        Kronecker blocks from K-FAC statistics, re-estimated at every step (the
                structured-inverse ablation; ``fls`` with ``structure=StructurePolicy()`` and
                ``refine_passes > 0`` refines them with the auxiliary loss)
``obert``       oBERT / WoodFisher block-50 Woodbury inverse of the empirical Fisher
``mfac``        static M-FAC (matrix-free, blocks of 2000)
``diag_fisher`` diagonal Fisher OBS
``magnitude``   ``Q = I``: global magnitude pruning
==============  ===========================================================================

Pruning proceeds in ``steps`` recomputation steps of rising sparsity (the density shrinks
geometrically to ``1 − sparsity``); at each step the curvature is (re-)estimated from
``samples_per_step`` fresh examples, the least salient weights (``ρ = w²/(2[Q]_qq)``) are pruned
and the survivors corrected by OBS. Every method sees the same examples.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_fls._memory import PeakMemory
from lightning_fls._validation import check_choice, check_positive, check_positive_int
from lightning_fls.baselines import (
    BlockWoodburyInverse,
    DiagonalInverse,
    IdentityCurvature,
    MFACInverse,
)
from lightning_fls.fishleg import (
    AuxiliaryOptimizer,
    CurvatureBlock,
    ExampleGradients,
    GradientCapture,
    LayerAdapter,
    Likelihood,
    StatisticsAccumulator,
    StructurePolicy,
    build_blocks,
    find_layers,
    get_likelihood,
    relative_damping,
)
from lightning_fls.masks import Scope, match_names, select_masks
from lightning_fls.obs import InverseCurvature, joint_block_obs_update, obs_saliency, obs_update

Method = Literal["fls", "kfac", "obert", "mfac", "diag_fisher", "magnitude"]
METHODS: tuple[str, ...] = ("fls", "kfac", "obert", "mfac", "diag_fisher", "magnitude")
FisherKind = Literal["empirical", "sampled"]
LossFn = Callable[[Tensor, Tensor], Tensor]


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
    masks: dict[str, Tensor] = field(repr=False, default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: sparsity {self.sparsity:.4f} (target {self.target_sparsity:.4f}), "
            f"{self.steps} step(s), {self.samples} samples, "
            f"predicted loss increase {self.predicted_loss_increase:.4g}, "
            f"curvature {self.curvature_seconds:.2f} s, state {self.curvature_state_mb:.1f} MB",
        ]
        lines += [f"  {name}: {value:.4f}" for name, value in self.layer_sparsity.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Options:
    method: str
    scope: Scope
    steps: int
    samples_per_step: int
    fisher: str
    likelihood: Likelihood | None
    damping: float
    max_layer_sparsity: float | None
    policy: StructurePolicy
    refine_passes: int
    reestimate: bool
    aux_lr: float
    gradient_batch_size: int
    block_size: int | None
    joint: bool
    seed: int
    progress: bool


def prune_one_shot(
    model: nn.Module,
    dataloader: Iterable[Any],
    loss_fn: LossFn,
    *,
    sparsity: float,
    method: Method = "fls",
    scope: Scope = "global",
    steps: int | None = None,
    samples_per_step: int = 1024,
    fisher: FisherKind = "empirical",
    likelihood: str | Likelihood | None = None,
    damping: float = 1e-2,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    max_layer_sparsity: float | None = None,
    structure: StructurePolicy | None = None,
    refine_passes: int = 0,
    reestimate: bool = True,
    aux_lr: float = 1e-3,
    gradient_batch_size: int = 16,
    block_size: int | None = None,
    joint: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PruningReport:
    """Prune a trained model in place to ``sparsity``, with FLS or a baseline, no fine-tuning.

    The weights of every Linear and Conv2d layer (and any type registered with
    :func:`~lightning_fls.fishleg.register_block`) are pruned; biases, norms and embeddings are
    not. Weights that are already exactly zero count as pruned. The model keeps its device,
    train/eval mode and ``requires_grad`` flags; parameters' ``.grad`` are not touched (the
    curvature work runs in eval mode). On any error the model is left as it was.

    Args:
        model: The trained model.
        dataloader: Yields ``(inputs, targets)`` batches; cycled if it runs out.
        loss_fn: ``loss_fn(model(inputs), targets)``, a scalar **mean** over the batch.
        sparsity: Target fraction of pruned weights in ``[0, 1)``; 0 is a no-op.
        method: ``"fls"`` (default), ``"kfac"``, ``"obert"``, ``"mfac"``, ``"diag_fisher"`` or
            ``"magnitude"`` (see the module docstring).
        scope: ``"global"`` (one ranking over all layers) or ``"layer"`` (the same sparsity in
            each layer).
        steps: Recomputation steps (default 16, and 1 for magnitude, where more change nothing).
        samples_per_step: Examples used for the curvature estimate at each step (rounded up to
            whole batches); the same for every method.
        fisher: ``"empirical"`` (data labels) or ``"sampled"`` (labels drawn from the model,
            i.e. the true Fisher; needs ``likelihood``).
        likelihood: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` or a
            :class:`~lightning_fls.fishleg.Likelihood`, for ``fisher="sampled"``.
        damping: γ relative to the mean of ``diag F`` over the pruned layers (> 0).
        include: Glob patterns of parameter names to prune (default: every layer weight).
        exclude: Glob patterns of parameter names not to prune.
        max_layer_sparsity: Optional cap on any layer's sparsity (global scope).
        structure: Block structure policy (default: block-diagonal, B = 50, for ``fls``;
            Kronecker for ``kfac``).
        refine_passes: ``fls`` only: auxiliary-loss passes over each step's batches after the
            statistics-based start (0 by default: for block-diagonal Q that start is already
            the auxiliary loss's exact minimiser for the step's data).
        reestimate: ``fls`` only: restart Q from the step's statistics before refining it
            (True), or keep refining the previous step's Q (False, the FLS paper's "refinement
            instead of re-estimation").
        aux_lr: ``fls`` only: learning rate of the auxiliary fit.
        gradient_batch_size: ``obert``/``mfac``: examples per gradient (``m`` = samples / this).
        block_size: ``obert``/``mfac``: block size (defaults 50 and 2000, as published).
        joint: Joint OBS inside blocks where Q has explicit blocks, instead of the sum of
            single updates. Default: on for ``fls``, off for ``obert`` (its published
            unstructured update); ignored where Q has no explicit blocks.
        seed: Seed of the random probes and sampled labels.
        progress: Show a progress bar.

    Returns:
        A :class:`PruningReport`.

    Raises:
        ValueError: For an invalid argument, no prunable layer, an empty loader, or a loss that
            is not a finite scalar.
        TypeError: If a batch is not an ``(inputs, targets)`` pair.
    """
    options = _check_options(
        sparsity=sparsity,
        method=method,
        scope=scope,
        steps=steps,
        samples_per_step=samples_per_step,
        fisher=fisher,
        likelihood=likelihood,
        damping=damping,
        max_layer_sparsity=max_layer_sparsity,
        structure=structure,
        refine_passes=refine_passes,
        reestimate=reestimate,
        aux_lr=aux_lr,
        gradient_batch_size=gradient_batch_size,
        block_size=block_size,
        joint=joint,
        seed=seed,
        progress=progress,
    )
    layers = _prunable_layers(model, include, exclude)
    batches = _BatchStream(dataloader, _model_device(model))
    if sparsity == 0.0:
        return _report(options, sparsity, layers, {}, 0.0, 0, 0, 0.0, 0.0, 0.0, None)

    saved = {key: copy.deepcopy(_layer_state(adapter)) for key, adapter in layers.items()}
    training = model.training
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()
        for adapter in layers.values():
            for name in adapter.parameter_names:
                getattr(adapter.module, name).requires_grad_(True)
        return _Pruner(model, loss_fn, layers, batches, options).run(sparsity)
    except BaseException:
        with torch.no_grad():
            for key, adapter in layers.items():
                for name, value in saved[key].items():
                    getattr(adapter.module, name).copy_(value)
        raise
    finally:
        model.train(training)
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])


def _check_options(**kw: Any) -> _Options:
    sparsity = kw["sparsity"]
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
    method = check_choice("method", kw["method"], METHODS)
    scope = check_choice("scope", kw["scope"], ("global", "layer"))
    steps = kw["steps"]
    if steps is None:
        steps = 1 if method == "magnitude" else 16
    steps = check_positive_int("steps", steps)
    fisher = check_choice("fisher", kw["fisher"], ("empirical", "sampled"))
    likelihood = None
    if fisher == "sampled":
        if kw["likelihood"] is None:
            raise ValueError(
                "`fisher='sampled'` needs `likelihood` (one of 'categorical', 'bernoulli', "
                "'gaussian', or a Likelihood instance)."
            )
        likelihood = get_likelihood(kw["likelihood"])
    cap = kw["max_layer_sparsity"]
    if cap is not None and not 0.0 < cap <= 1.0:
        raise ValueError(f"`max_layer_sparsity` must be in (0, 1], got {cap!r}.")
    structure = kw["structure"]
    if structure is not None and not isinstance(structure, StructurePolicy):
        raise TypeError(f"`structure` must be a StructurePolicy, got {type(structure).__name__}.")
    if structure is None:
        structure = StructurePolicy(default="block_diagonal" if method == "fls" else "kronecker")
    joint = kw["joint"]
    if joint is None:
        joint = method == "fls"
    block_size = kw["block_size"]
    if block_size is not None:
        block_size = check_positive_int("block_size", block_size)
    return _Options(
        method=method,
        scope=scope,  # type: ignore[arg-type]
        steps=steps,
        samples_per_step=check_positive_int("samples_per_step", kw["samples_per_step"]),
        fisher=fisher,
        likelihood=likelihood,
        damping=check_positive("damping", kw["damping"]),
        max_layer_sparsity=cap,
        policy=structure,
        refine_passes=_check_non_negative_int("refine_passes", kw["refine_passes"]),
        reestimate=bool(kw["reestimate"]),
        aux_lr=check_positive("aux_lr", kw["aux_lr"]),
        gradient_batch_size=check_positive_int("gradient_batch_size", kw["gradient_batch_size"]),
        block_size=block_size,
        joint=bool(joint),
        seed=int(kw["seed"]),
        progress=bool(kw["progress"]),
    )


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    return value


def _prunable_layers(
    model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str] | None
) -> dict[str, LayerAdapter]:
    layers = find_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer (Linear, Conv2d or a type registered "
            "with lightning_fls.fishleg.register_block)."
        )
    kept = match_names(list(layers), include, exclude)
    if not kept:
        raise ValueError("`include`/`exclude` leave no layer to prune.")
    return {key: layers[key] for key in kept}


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _layer_state(adapter: LayerAdapter) -> dict[str, Tensor]:
    return {name: getattr(adapter.module, name).detach() for name in adapter.parameter_names}


class _BatchStream:
    """Cycles over a dataloader, checks batches and moves them to the model's device."""

    def __init__(self, dataloader: Iterable[Any], device: torch.device) -> None:
        self.dataloader = dataloader
        self.device = device
        self._iterator: Iterator[Any] = iter(dataloader)
        try:
            self._first: Any = next(self._iterator)
        except StopIteration:
            raise ValueError("`dataloader` is empty.") from None

    def next(self) -> tuple[Tensor, Tensor]:
        if self._first is not None:
            batch, self._first = self._first, None
        else:
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = iter(self.dataloader)
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    raise ValueError("`dataloader` is empty.") from None
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"Batches must be (inputs, targets) pairs, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                + "."
            )
        inputs, targets = batch
        return _to(inputs, self.device), _to(targets, self.device)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


@dataclass
class _StepData:
    """Per-example gradients of one recomputation step's batches."""

    batches: list[dict[str, ExampleGradients]]
    samples: int


class _Pruner:
    """Runs the recomputation steps for one call of :func:`prune_one_shot`."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        layers: dict[str, LayerAdapter],
        batches: _BatchStream,
        options: _Options,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.layers = layers
        self.batches = batches
        self.options = options
        self.device = batches.device
        self.capture = GradientCapture(layers, keep_outputs=True)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.masks = {key: (_weight(a) != 0) for key, a in layers.items()}
        self.blocks: dict[str, CurvatureBlock] | None = None
        self.aux: AuxiliaryOptimizer | None = None

    def run(self, sparsity: float) -> PruningReport:
        opts = self.options
        targets = [1.0 - (1.0 - sparsity) ** ((i + 1) / opts.steps) for i in range(opts.steps)]
        predicted, samples, state_mb, gamma = 0.0, 0, 0.0, 0.0
        bar = tqdm(
            total=opts.steps, desc=f"prune_one_shot[{opts.method}]", disable=not opts.progress
        )
        start = time.perf_counter()
        with PeakMemory(self.device) as memory:
            for target in targets:
                curvature, step_samples, gamma, step_mb = self._curvature()
                samples += step_samples
                state_mb = max(state_mb, step_mb)
                predicted += self._prune_step(curvature, target)
                bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        return _report(
            opts, sparsity, self.layers, self.masks, predicted, opts.steps, samples, gamma,
            seconds, state_mb, memory.peak_mb,
        )  # fmt: skip

    # -- curvature -----------------------------------------------------------------------------

    def _gradients(self) -> _StepData:
        """Per-example gradients of enough batches for ``samples_per_step`` examples."""
        data: list[dict[str, ExampleGradients]] = []
        samples = 0
        while samples < self.options.samples_per_step:
            inputs, targets = self.batches.next()
            with self.capture:
                outputs = self.model(inputs)
                loss = self.loss_fn(outputs, targets)
                _check_loss(loss)
                if self.options.fisher == "sampled":
                    assert self.options.likelihood is not None
                    grads = self.capture.sampled_gradients(
                        outputs, self.options.likelihood, generator=self.generator
                    )
                else:
                    self.capture.backward(loss)
                    grads = self.capture.example_gradients(loss_reduction="mean")
            self.capture.clear()
            data.append(grads)
            samples += next(iter(grads.values())).batch_size
        return _StepData(batches=data, samples=samples)

    def _curvature(self) -> tuple[dict[str, InverseCurvature], int, float, float]:
        method = self.options.method
        if method == "magnitude":
            return (
                {
                    k: IdentityCurvature(a.canonical_shape, self.device)
                    for k, a in self.layers.items()
                },
                0,
                0.0,
                0.0,
            )
        step = self._gradients()
        damping = relative_damping(_merge(step), self.options.damping)
        gamma = next(iter(damping.values()))
        if method in ("fls", "kfac"):
            estimates, mb = self._fishleg(step, gamma)
        elif method == "diag_fisher":
            estimates, mb = self._diagonal(step, gamma)
        else:
            estimates, mb = self._minibatch_gradient_method(step, gamma)
        return estimates, step.samples, gamma, mb

    def _fishleg(self, step: _StepData, gamma: float) -> tuple[dict[str, InverseCurvature], float]:
        opts = self.options
        first = self.blocks is None
        if first:
            self.blocks = build_blocks(self.layers, policy=opts.policy, init_scale=1 / gamma)
        assert self.blocks is not None
        if first or opts.method == "kfac" or opts.reestimate:
            # Statistics-based start; kfac (and fls with reestimate) restart at every step.
            for key, block in self.blocks.items():
                accumulator = block.new_statistics()
                mask = self._canonical_mask(key).float()
                for grads in step.batches:
                    accumulator.update(grads[key], mask=mask)
                block.init_from_statistics(accumulator.result(), gamma)
            self.aux = None  # λ jumped: the optimiser's moments no longer apply
        if opts.method == "fls" and opts.refine_passes > 0:
            if self.aux is None:
                self.aux = AuxiliaryOptimizer(self.blocks, lr=opts.aux_lr, seed=opts.seed)
            masks = {k: self._canonical_mask(k) for k in self.layers}
            for _ in range(opts.refine_passes):
                for grads in step.batches:
                    self.aux.step({k: g.fvp for k, g in grads.items()}, gamma, masks=masks)
        state = sum(b.aux_state_bytes() for b in self.blocks.values())
        return {k: _NoGrad(b) for k, b in self.blocks.items()}, state / 2**20

    def _diagonal(self, step: _StepData, gamma: float) -> tuple[dict[str, InverseCurvature], float]:
        estimates: dict[str, InverseCurvature] = {}
        for key in self.layers:
            accumulator = StatisticsAccumulator({"diag_fisher"})
            for grads in step.batches:
                accumulator.update(grads[key])
            diag = accumulator.result().diag_fisher
            assert diag is not None
            estimates[key] = DiagonalInverse(diag * self._canonical_mask(key), gamma)
        mb = sum(e.diag_q().numel() * 4 for e in estimates.values()) / 2**20
        return estimates, mb

    def _minibatch_gradient_method(
        self, step: _StepData, gamma: float
    ) -> tuple[dict[str, InverseCurvature], float]:
        opts = self.options
        size = opts.gradient_batch_size
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key, adapter in self.layers.items():
            mask = self._canonical_mask(key).float()
            minibatch = _minibatch_gradients([g[key] for g in step.batches], size) * mask
            if opts.method == "obert":
                woodbury = BlockWoodburyInverse(
                    adapter.canonical_shape,
                    num_gradients=minibatch.shape[0],
                    damping=gamma,
                    block_size=opts.block_size or 50,
                    device=self.device,
                )
                for chunk in torch.split(minibatch, 64):
                    woodbury.update(chunk)
                estimates[key], state = woodbury, state + woodbury.state_bytes()
            else:
                mfac = MFACInverse(minibatch, damping=gamma, block_size=opts.block_size or 2000)
                estimates[key], state = mfac, state + mfac.state_bytes()
        return estimates, state / 2**20

    # -- pruning -------------------------------------------------------------------------------

    def _canonical_mask(self, key: str) -> Tensor:
        adapter = self.layers[key]
        parts = {name: torch.ones_like(getattr(adapter.module, name), dtype=torch.bool)
                 for name in adapter.parameter_names}  # fmt: skip
        parts[adapter.key_parameter] = self.masks[key]
        return adapter.to_canonical(parts)

    @torch.no_grad()
    def _prune_step(self, curvature: Mapping[str, InverseCurvature], target: float) -> float:
        opts = self.options
        saliency = {}
        weights = {}
        for key, adapter in self.layers.items():
            weights[key] = adapter.canonical_weight()
            canonical = obs_saliency(weights[key], curvature[key].diag_q())
            saliency[key] = adapter.from_canonical(canonical)[adapter.key_parameter]
        new_masks = select_masks(
            saliency,
            self.masks,
            target,
            scope=opts.scope,
            max_layer_sparsity=opts.max_layer_sparsity,
        )
        predicted = 0.0
        for key, adapter in self.layers.items():
            prune_param = self.masks[key] & ~new_masks[key]
            if not bool(prune_param.any()):
                continue
            self.masks[key] = new_masks[key]
            keep = self._canonical_mask(key)
            prune = self._canonical_from_weight(key, prune_param)
            estimate = curvature[key]
            if opts.joint and _has_blocks(estimate):
                update = joint_block_obs_update(weights[key], estimate, prune, keep)  # type: ignore[arg-type]
            else:
                update = obs_update(
                    weights[key], estimate, prune, keep, correct=opts.method != "magnitude"
                )
            predicted += update.predicted_increase
            for name, value in adapter.from_canonical(update.weight).items():
                getattr(adapter.module, name).copy_(value)
        return predicted

    def _canonical_from_weight(self, key: str, weight_part: Tensor) -> Tensor:
        adapter = self.layers[key]
        parts = {name: torch.zeros_like(getattr(adapter.module, name), dtype=torch.bool)
                 for name in adapter.parameter_names}  # fmt: skip
        parts[adapter.key_parameter] = weight_part
        return adapter.to_canonical(parts)


class _NoGrad:
    """A curvature block's Q·V and diag(Q) without autograd, detached."""

    def __init__(self, block: CurvatureBlock) -> None:
        self.block = block

    def qv(self, V: Tensor) -> Tensor:
        with torch.no_grad():
            return self.block.qv(V)

    def diag_q(self) -> Tensor:
        with torch.no_grad():
            return self.block.diag_q()

    @property
    def has_blocks(self) -> bool:
        return hasattr(self.block, "block_matrices")

    def block_matrices(self) -> tuple[Tensor, int]:
        with torch.no_grad():
            blocks: tuple[Tensor, int] = getattr(self.block, "block_matrices")()  # noqa: B009
            return blocks


def _has_blocks(estimate: InverseCurvature) -> bool:
    if isinstance(estimate, _NoGrad):
        return estimate.has_blocks
    return hasattr(estimate, "block_matrices")


def _weight(adapter: LayerAdapter) -> Tensor:
    weight: Tensor = getattr(adapter.module, adapter.key_parameter).detach()
    return weight


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a scalar tensor (the batch mean), got {shape}.")
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"`loss_fn` returned a non-finite loss ({float(loss.detach())}).")


def _merge(step: _StepData) -> dict[str, ExampleGradients]:
    """The step's per-layer gradients of its first batch (enough to set the damping scale)."""
    return step.batches[0]


def _minibatch_gradients(per_batch: list[ExampleGradients], size: int) -> Tensor:
    """Mean gradients over consecutive groups of ``size`` examples, ``[m, d_out, d_in']``."""
    out = []
    for grads in per_batch:
        batch = grads.batch_size
        groups = math.ceil(batch / size)
        coefficients = torch.zeros(
            groups, batch, device=grads.combine(torch.zeros(1, batch)).device
        )
        for g in range(groups):
            members = slice(g * size, min((g + 1) * size, batch))
            coefficients[g, members] = 1.0 / (members.stop - members.start)
        out.append(grads.combine(coefficients))
    return torch.cat(out)


def _report(
    options: _Options,
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
) -> PruningReport:
    zeros = {key: int((_weight(a) == 0).sum()) for key, a in layers.items()}
    sizes = {key: _weight(a).numel() for key, a in layers.items()}
    return PruningReport(
        method=options.method,
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
        masks={key: m.clone() for key, m in masks.items()},
    )
