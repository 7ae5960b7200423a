"""The pruning engine shared by :func:`~lightning_fls.prune_one_shot` and the callback.

Given per-example gradients of some batches (:class:`StepData`), a :class:`PruningEngine` builds
each method's inverse-curvature estimate ``Q ≈ (F + γI)⁻¹`` and takes one OBS step to a target
sparsity: saliencies ``ρ = w²/(2[Q]_qq)``, mask selection (:mod:`lightning_fls.masks`), the OBS
correction of the survivors (:mod:`lightning_fls.obs`) and hard zeros. It holds the masks, keyed
by the pruned weight's fully-qualified name. Where the gradients come from is the caller's
business: ``prune_one_shot`` draws batches from a dataloader, the callback records the training
step's own backward.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_fls._linalg import FallbackCounter, damped_inverse_root
from lightning_fls._validation import (
    check_choice,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    check_sparsity,
)
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
    LayerAdapter,
    Likelihood,
    StatisticsAccumulator,
    StructurePolicy,
    aux_loss,
    build_blocks,
    find_layers,
    get_likelihood,
    relative_damping,
    transformer_blocks,
)
from lightning_fls.fishleg.attention import in_blocks
from lightning_fls.masks import Scope, match_names, select_masks
from lightning_fls.obs import (
    InverseCurvature,
    choose_group_prunes,
    group_obs_update,
    joint_block_obs_update,
    obs_saliency,
    obs_update,
    q_sub_blocks,
)
from lightning_fls.patterns import (
    NMPattern,
    as_rows,
    check_fits,
    parse_pattern,
    pruned_per_group,
)
from lightning_fls.safeguard import LossProbe, StepOutcome, check_step, snapshot, warn_reverted
from lightning_fls.sparsegpt import damped_hessian, input_hessian, sparsegpt_prune

METHODS: tuple[str, ...] = (
    "fls",
    "kfac",
    "obert",
    "mfac",
    "diag_fisher",
    "sparsegpt",
    "magnitude",
)
Method = Literal["fls", "kfac", "obert", "mfac", "diag_fisher", "sparsegpt", "magnitude"]
FisherKind = Literal["empirical", "sampled"]
AUX_DIVERGENCE_FACTOR = 10.0
"""A layer's auxiliary fit has diverged when its loss exceeds ``A₀ + 10·|A₀|`` (``A₀``: first)."""
DAMPING_RAISE = 10.0
"""Factor by which γ is raised after the auxiliary fit diverged, or after an OBS step whose
corrections did worse than plain zeroing (:mod:`lightning_fls.safeguard`)."""


@dataclass(frozen=True)
class PruningOptions:
    """Validated options of the engine (see :func:`~lightning_fls.prune_one_shot`)."""

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
    pattern: NMPattern | None = None


def check_options(**kw: Any) -> PruningOptions:
    """Validate the engine options (keyword names as in :func:`~lightning_fls.prune_one_shot`)."""
    check_sparsity("sparsity", kw["sparsity"])
    method = check_choice("method", kw["method"], METHODS)
    pattern = parse_pattern(kw.get("pattern"))
    if pattern is not None and kw["sparsity"] > pattern.sparsity + 1e-9:
        raise ValueError(
            f"`pattern` {pattern} prunes {pattern.n} of every {pattern.m} weights, a sparsity of "
            f"{pattern.sparsity:g}; the target sparsity {kw['sparsity']:g} is above it. Use "
            f"{pattern.sparsity:g} for the exact pattern (or less, for a partial one)."
        )
    scope = kw["scope"]
    if scope is None:
        scope = "layer" if method == "sparsegpt" else "global"
    scope = check_choice("scope", scope, ("global", "layer"))
    if method == "sparsegpt" and scope == "global":
        raise ValueError(
            "`method='sparsegpt'` prunes every layer to the same sparsity (it reconstructs each "
            "layer on its own, so saliencies of different layers do not compare); pass "
            "scope='layer'."
        )
    steps = kw["steps"]
    if steps is None:
        steps = 1 if method in ("magnitude", "sparsegpt") else 16
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
    return PruningOptions(
        method=method,
        scope=scope,  # type: ignore[arg-type]
        steps=steps,
        samples_per_step=check_positive_int("samples_per_step", kw["samples_per_step"]),
        fisher=fisher,
        likelihood=likelihood,
        damping=check_positive("damping", kw["damping"]),
        max_layer_sparsity=cap,
        policy=structure,
        refine_passes=check_non_negative_int("refine_passes", kw["refine_passes"]),
        reestimate=bool(kw["reestimate"]),
        aux_lr=check_positive("aux_lr", kw["aux_lr"]),
        gradient_batch_size=check_positive_int("gradient_batch_size", kw["gradient_batch_size"]),
        block_size=block_size,
        joint=bool(joint),
        seed=int(kw["seed"]),
        progress=bool(kw["progress"]),
        pattern=pattern,
    )


def prunable_layers(
    model: nn.Module,
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    *,
    trainable_only: bool = False,
) -> dict[str, LayerAdapter]:
    """Adapters of the layers to prune, keyed by weight name; clear errors if there are none.

    Without ``include``, every registered layer (Linear, Conv2d, ``nn.MultiheadAttention``'s
    packed in-projection, types added with ``register_block``) is pruned, except in a
    transformer: when the model has attention modules (``nn.MultiheadAttention``, or a class
    whose name ends in ``Attention``), only the layers inside the transformer blocks (the
    attention modules' parents: attention and MLP projections) are, so embeddings and the
    output head stay dense. ``include`` selects among all registered layers by glob, and also
    reaches a norm, an embedding or any other module with parameters when an entry is exactly
    its weight's name (``"norm.weight"``), seen through the generic adapter.

    Args:
        model: The model.
        include: Glob patterns of weight names to prune (None: the default set above).
        exclude: Glob patterns of weight names not to prune.
        trainable_only: Leave out weights frozen with ``requires_grad=False`` (for training:
            an optimizer never moves them). A frozen weight that ``include`` names is an error.

    Raises:
        ValueError: If there is no prunable layer, a pattern matches nothing, only frozen
            weights are left, two selected layers share one weight tensor (tied weights), or
            a selected layer cannot be recorded (attention with ``add_bias_kv``).
    """
    layers = find_layers(model)
    if include is not None:  # norms, embeddings …: only when named exactly
        named = set(include)
        layers = {
            key: layers.get(key, adapter)
            for key, adapter in find_layers(model, fallback=True).items()
            if key in layers or key in named
        }
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer (Linear, Conv2d, MultiheadAttention "
            "or a type registered with lightning_fls.fishleg.register_block)."
        )
    if include is None:
        blocks = transformer_blocks(model)
        candidates = [key for key in layers if not blocks or in_blocks(key, blocks)]
        # Exclude patterns may name layers outside the default set (a transformer's head).
        allowed = set(match_names(list(layers), None, exclude))
        kept = [key for key in candidates or layers if key in allowed]
    else:
        kept = match_names(list(layers), include, exclude)
    if trainable_only:
        frozen = [key for key in kept if not _weight_parameter(layers[key]).requires_grad]
        if frozen and include is not None:
            raise ValueError(
                f"`include` selects weights frozen with requires_grad=False: {frozen}. An "
                "optimizer never moves them; unfreeze them or leave them out of `include`."
            )
        if frozen and len(frozen) == len(kept):
            raise ValueError(
                f"Every prunable weight of {type(model).__name__} is frozen "
                f"(requires_grad=False): {frozen}. Unfreeze the layers to prune."
            )
        kept = [key for key in kept if key not in frozen]
    if not kept:
        raise ValueError("`include`/`exclude` leave no layer to prune.")
    owners: dict[int, str] = {}
    for key in kept:
        other = owners.setdefault(id(_weight_parameter(layers[key])), key)
        if other != key:
            raise ValueError(
                f"`{other}` and `{key}` are one tensor (tied weights): lightning_fls prunes "
                f"each weight as one layer. Leave both out with exclude=[{other!r}, {key!r}]."
            )
        try:
            layers[key].check_supported()
        except ValueError as error:
            raise ValueError(f"`{key}`: {error}") from None
    return {key: layers[key] for key in kept}


def _weight_parameter(adapter: LayerAdapter) -> Tensor:
    weight: Tensor = getattr(adapter.module, adapter.key_parameter)
    return weight


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def layer_state(adapter: LayerAdapter) -> dict[str, Tensor]:
    """The layer's parameters by attribute name, detached (not copied)."""
    return {name: getattr(adapter.module, name).detach() for name in adapter.parameter_names}


@dataclass
class StepData:
    """Per-example gradients of one recomputation step's batches."""

    batches: list[dict[str, ExampleGradients]]
    samples: int


class PruningEngine:
    """Curvature estimates and OBS steps for a fixed set of layers, holding their masks.

    Args:
        layers: Adapters of the layers to prune, keyed by weight name.
        options: Validated options (:func:`check_options`).
        device: Device of the model.

    Attributes:
        masks: ``True`` = kept, by weight name, shaped like the weights. Weights that are zero
            at construction count as pruned.
        blocks: FishLeg curvature blocks (``fls``/``kfac``), built at the first estimate.
        damping_scale: Factor on the relative damping (1, times :data:`DAMPING_RAISE` after
            each divergence of the auxiliary fit).
        rollbacks: How many times a diverged auxiliary fit was rolled back.
        skipped_aux_updates: Layer updates of the auxiliary fit skipped because their loss or
            gradient was not finite (they never reach Q).
        safeguard_reverts: Layer corrections undone by the realised-versus-predicted check
            (:mod:`lightning_fls.safeguard`) because they did worse than plain zeroing.
        factorisation_fallbacks: Matrices (curvature blocks, factors, OBS systems) whose
            float64 Cholesky factorisation failed and that were factorised with an eigenvalue
            floor instead (:mod:`lightning_fls._linalg`); 0 on well-posed data.
    """

    def __init__(
        self, layers: dict[str, LayerAdapter], options: PruningOptions, device: torch.device
    ) -> None:
        self.layers = layers
        self.options = options
        self.device = device
        self.masks = {key: (weight_of(a) != 0) for key, a in layers.items()}
        if options.pattern is not None:
            for key in layers:
                check_fits(key, self.masks[key].shape, options.pattern)
        self._group_positions: dict[str, tuple[Tensor, Tensor]] = {}
        self.blocks: dict[str, CurvatureBlock] | None = None
        self.aux: AuxiliaryOptimizer | None = None
        self.generator = torch.Generator().manual_seed(options.seed)
        self.damping_scale = 1.0
        self.rollbacks = 0
        self.skipped_aux_updates = 0
        self.factorisation_fallbacks = 0
        self.safeguard_reverts = 0

    def aux_loss(self, step: StepData, gamma: float, probes: int = 4) -> float | None:
        """The FishLeg auxiliary loss ``Σ_layers Â(λ; u)`` of the current blocks.

        Evaluated on the last batch of ``step`` with ``probes`` Gaussian probes per layer
        (masked), for logging. None where there are no FishLeg blocks (baselines).
        """
        if self.blocks is None or not step.batches or gamma <= 0:
            return None
        grads = step.batches[-1]
        total = 0.0
        for key, block in self.blocks.items():
            shape = self.layers[key].canonical_shape
            u = torch.randn((probes, *shape), generator=self.generator).to(self.device)
            total += float(
                aux_loss(block, grads[key].fvp, u, gamma, mask=self.canonical_mask(key).float())
            )
        return total

    def curvature(
        self, step: StepData | None
    ) -> tuple[dict[str, InverseCurvature], int, float, float]:
        """Each layer's inverse-curvature estimate from one step's gradients.

        Args:
            step: Per-example gradients (ignored, and may be None, for magnitude).

        Returns:
            ``(estimates by weight name, samples used, γ (absolute), estimate state in MB)``.
        """
        with FallbackCounter() as fallbacks:
            result = self._curvature(step)
        self._count_fallbacks(fallbacks.count, "estimate")
        return result

    def _count_fallbacks(self, count: int, where: str) -> None:
        if not count:
            return
        self.factorisation_fallbacks += count
        warnings.warn(
            f"{count} matri{'x' if count == 1 else 'ces'} of the {self.options.method} {where} "
            "could not be factorised by Cholesky in float64 and went through an eigenvalue "
            "floor instead (counted in `factorisation_fallbacks`). The curvature data are close "
            "to singular: a larger `damping` avoids this.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _curvature(
        self, step: StepData | None
    ) -> tuple[dict[str, InverseCurvature], int, float, float]:
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
        if step is None or not step.batches:
            raise ValueError(f"method={method!r} needs gradients, and none were recorded.")
        damping = relative_damping(step.batches, self.options.damping)
        gamma = next(iter(damping.values())) * self.damping_scale
        if method in ("fls", "kfac"):
            estimates, mb = self._fishleg(step, gamma)
        elif method == "diag_fisher":
            estimates, mb = self._diagonal(step, gamma)
        elif method == "sparsegpt":
            estimates, mb = self._input_hessians(step)
        else:
            estimates, mb = self._minibatch_gradient_method(step, gamma)
        return estimates, step.samples, gamma, mb

    def _fishleg(self, step: StepData, gamma: float) -> tuple[dict[str, InverseCurvature], float]:
        opts = self.options
        first = self.blocks is None
        if first:
            self.blocks = build_blocks(self.layers, policy=opts.policy, init_scale=1 / gamma)
        assert self.blocks is not None
        if first or opts.method == "kfac" or opts.reestimate:
            # Statistics-based start; kfac (and fls with reestimate) restart at every step.
            for key, block in self.blocks.items():
                accumulator = block.new_statistics()
                mask = self.canonical_mask(key).float()
                for grads in step.batches:
                    accumulator.update(grads[key], mask=mask)
                block.init_from_statistics(accumulator.result(), gamma)
            self.aux = None  # λ jumped: the optimiser's moments no longer apply
        if opts.method == "fls" and opts.refine_passes > 0:
            self._refine(step, gamma)
        state = sum(b.aux_state_bytes() for b in self.blocks.values())
        return {k: _NoGrad(b) for k, b in self.blocks.items()}, state / 2**20

    def _refine(self, step: StepData, gamma: float) -> None:
        """Auxiliary (Adam) passes over the step's batches, rolled back if the fit diverges.

        The blocks' λ before the passes is the last good state. A layer update whose loss or
        gradient is not finite is skipped (counted in :attr:`skipped_aux_updates`). If the summed
        auxiliary loss rises past ``A₀ + AUX_DIVERGENCE_FACTOR·|A₀|``, or a block's ``diag(Q)``
        ends non-finite or non-positive, λ returns to the last good state, the optimiser's
        moments are dropped, the damping of later estimates is raised by ``DAMPING_RAISE`` and a
        warning says so.
        """
        assert self.blocks is not None
        opts = self.options
        if self.aux is None:
            self.aux = AuxiliaryOptimizer(self.blocks, lr=opts.aux_lr, seed=opts.seed)
        good = {key: _copy_state(block) for key, block in self.blocks.items()}
        masks = {k: self.canonical_mask(k) for k in self.layers}
        first: dict[str, float] = {}
        diverged = False
        for _ in range(opts.refine_passes):
            for grads in step.batches:
                result = self.aux.step({k: g.fvp for k, g in grads.items()}, gamma, masks=masks)
                self.skipped_aux_updates += len(result.skipped)
                for key, loss in result.losses.items():
                    if key in result.skipped:
                        continue
                    start = first.setdefault(key, loss)
                    diverged |= loss > start + AUX_DIVERGENCE_FACTOR * abs(start)
                if diverged:
                    break
            if diverged:
                break
        if diverged or not all(_finite_positive(b.diag_q()) for b in self.blocks.values()):
            for key, block in self.blocks.items():
                block.load_state_dict(good[key])
            self.aux = None
            self.rollbacks += 1
            self.damping_scale *= DAMPING_RAISE
            warnings.warn(
                f"The FishLeg auxiliary fit diverged (aux_lr={opts.aux_lr:g}, damping "
                f"{gamma:.3g}); Q was rolled back to its state before the fit and the damping "
                f"of later estimates raised {DAMPING_RAISE:g}× (now {self.damping_scale:g}× "
                f"the configured value). Lower `aux_lr` if this repeats.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _input_hessians(self, step: StepData) -> tuple[dict[str, InverseCurvature], float]:
        """SparseGPT's layer-wise ``H = Σ x xᵀ`` over the step's inputs (bias column of ones)."""
        estimates: dict[str, InverseCurvature] = {}
        for key in self.layers:
            hessian: Tensor | None = None
            for grads in step.batches:
                inputs = getattr(grads[key], "inputs", None)
                if inputs is None or inputs.shape[2] != 1:
                    raise ValueError(
                        f"`method='sparsegpt'` needs a layer whose rows all see one input (Linear, "
                        f"ungrouped Conv2d, MultiheadAttention); `{key}` is not one. Leave it out "
                        "with `exclude`."
                    )
                part = input_hessian(inputs)
                hessian = part if hessian is None else hessian + part
            assert hessian is not None
            estimates[key] = InputHessian(hessian, self.layers[key].canonical_shape)
        mb = sum(e.hessian.numel() * 8 for e in estimates.values()) / 2**20  # type: ignore[attr-defined]
        return estimates, mb

    def _diagonal(self, step: StepData, gamma: float) -> tuple[dict[str, InverseCurvature], float]:
        estimates: dict[str, InverseCurvature] = {}
        for key in self.layers:
            accumulator = StatisticsAccumulator({"diag_fisher"})
            for grads in step.batches:
                accumulator.update(grads[key])
            diag = accumulator.result().diag_fisher
            assert diag is not None
            estimates[key] = DiagonalInverse(diag * self.canonical_mask(key), gamma)
        mb = sum(e.diag_q().numel() * 4 for e in estimates.values()) / 2**20
        return estimates, mb

    def _minibatch_gradient_method(
        self, step: StepData, gamma: float
    ) -> tuple[dict[str, InverseCurvature], float]:
        opts = self.options
        size = opts.gradient_batch_size
        estimates: dict[str, InverseCurvature] = {}
        state = 0
        for key, adapter in self.layers.items():
            mask = self.canonical_mask(key).float()
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

    def canonical_mask(self, key: str) -> Tensor:
        """The layer's mask in its canonical ``[d_out, d_in']`` form (bias columns kept)."""
        adapter = self.layers[key]
        parts = {name: torch.ones_like(getattr(adapter.module, name), dtype=torch.bool)
                 for name in adapter.parameter_names}  # fmt: skip
        parts[adapter.key_parameter] = self.masks[key]
        return adapter.to_canonical(parts)

    def prune_step(
        self,
        curvature: Mapping[str, InverseCurvature],
        target: float,
        loss: LossProbe | None = None,
    ) -> StepOutcome:
        """Prune to ``target`` sparsity (see :meth:`_prune_step`), checked against ``loss``.

        With a ``loss`` probe (the mean loss on the calibration batches), the realised loss
        increase is measured and compared with the prediction (:mod:`lightning_fls.safeguard`):
        corrections that did worse than plain zeroing are undone, named in a warning, and the
        damping of later steps is raised.

        Args:
            curvature: Each layer's estimate (:meth:`curvature`).
            target: The sparsity to reach.
            loss: Optional probe of the calibration loss.

        Returns:
            The step's predicted and (with ``loss``) realised loss increase.
        """
        before_step = snapshot(self.layers) if loss is not None else {}
        loss_before = loss() if loss is not None else None
        with FallbackCounter() as fallbacks:
            predicted = self._prune_step(curvature, target)
        self._count_fallbacks(fallbacks.count, "OBS solve")
        if loss is None or loss_before is None:
            return StepOutcome(predicted)
        outcome = check_step(self.layers, self.masks, before_step, loss_before, loss, predicted)
        if outcome.reverted:
            self.safeguard_reverts += len(outcome.reverted)
            self.damping_scale *= DAMPING_RAISE
            warn_reverted(outcome, self.options.method, self.damping_scale)
        return outcome

    @torch.no_grad()
    def _prune_step(self, curvature: Mapping[str, InverseCurvature], target: float) -> float:
        """Prune to ``target`` sparsity with saliencies and OBS corrections from ``curvature``.

        Unstructured: the lowest ``ρ = w²/(2[Q]_qq)`` go, then the sum-of-singles update (or
        the joint update inside Q's blocks with ``joint``). With an N:M pattern, candidates
        are taken in ``ρ`` order under the cap of ``n`` per group; at the pattern's own
        sparsity, where every group fills up, each group's set is instead the one of least
        group saliency ``½ w_Pᵀ (Q_PP)⁻¹ w_P``; the update is then the group form of OBS
        (:func:`~lightning_fls.obs.group_obs_update`), or the joint block update with
        ``joint``.

        Returns:
            The predicted loss increase of the newly pruned weights (``Σ ρ``, or the joint
            forms' own prediction).
        """
        opts = self.options
        pattern = opts.pattern
        if opts.method == "sparsegpt":
            return self._sparsegpt_step(curvature, target)
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
            pattern=pattern,
        )
        fill = pattern is not None and target >= pattern.sparsity - 1e-9
        predicted = 0.0
        for key, adapter in self.layers.items():
            groups = index = sub_blocks = None
            if pattern is not None:
                groups, index = self._groups(key, pattern.m)
                if fill and opts.method != "magnitude":
                    # Every group fills up: choose each group's set by its joint OBS cost.
                    sub_blocks = q_sub_blocks(curvature[key], index)
                    before = ~self.masks[key].reshape(-1)[groups]
                    chosen = choose_group_prunes(
                        weights[key].reshape(-1)[index], before, sub_blocks, pattern.n
                    )
                    mask = self.masks[key].clone()
                    mask.view(-1)[groups[chosen]] = False
                    new_masks[key] = mask
            prune_param = self.masks[key] & ~new_masks[key]
            if not bool(prune_param.any()):
                continue
            self.masks[key] = new_masks[key]
            keep = self.canonical_mask(key)
            prune = self._canonical_from_weight(key, prune_param)
            estimate = curvature[key]
            if opts.method == "magnitude":
                update = obs_update(weights[key], estimate, prune, keep, correct=False)
            elif opts.joint and _has_blocks(estimate):
                update = joint_block_obs_update(weights[key], estimate, prune, keep)  # type: ignore[arg-type]
            elif pattern is not None and groups is not None and index is not None:
                pruned = ~self.masks[key].reshape(-1)[groups]
                update = group_obs_update(weights[key], estimate, index, pruned, keep, sub_blocks)
            else:
                update = obs_update(weights[key], estimate, prune, keep)
            predicted += update.predicted_increase
            for name, value in adapter.from_canonical(update.weight).items():
                getattr(adapter.module, name).copy_(value)
        return predicted

    def _sparsegpt_step(self, curvature: Mapping[str, InverseCurvature], target: float) -> float:
        """Each layer to ``target`` by SparseGPT's column sweep (masks chosen as it goes).

        Returns:
            The summed layer-wise reconstruction error estimate ``½ Σ err²`` (not a loss).
        """
        opts = self.options
        total = 0.0
        for key, adapter in self.layers.items():
            mask = self.masks[key]
            pruned = int((~mask).sum())
            count = round(target * mask.numel())
            if opts.pattern is not None:
                # Groups that held more than n zeros already leave less room (as select_masks).
                held = pruned_per_group(mask, opts.pattern)
                count = min(count, pruned + int((opts.pattern.n - held).clamp_min(0).sum()))
            if count <= pruned:
                continue
            estimate = curvature[key]
            assert isinstance(estimate, InputHessian)
            weight = adapter.canonical_weight()
            keep = self.canonical_mask(key)
            columns = as_rows(mask).shape[1]
            if tuple(as_rows(mask).shape) != tuple(weight[:, :columns].shape):
                raise ValueError(
                    f"`method='sparsegpt'` needs the weight of `{key}` to be the leading columns "
                    "of its canonical matrix (Linear, Conv2d, MultiheadAttention)."
                )
            result = sparsegpt_prune(
                weight,
                estimate.hessian,
                keep,
                target=count,
                prunable_columns=columns,
                pattern=opts.pattern,
            )
            total += result.error
            parts = adapter.from_canonical(result.weight.to(weight.dtype))
            self.masks[key] = adapter.from_canonical(result.keep)[adapter.key_parameter].clone()
            for name, value in parts.items():
                getattr(adapter.module, name).copy_(value)
        return total

    def _groups(self, key: str, m: int) -> tuple[Tensor, Tensor]:
        """The layer's N:M groups: flat weight positions and flat canonical positions, ``[G, m]``.

        Groups run along the weight's rows (:mod:`lightning_fls.patterns`); the canonical
        position of every weight entry comes from the adapter's own layout. The layout never
        changes, so each layer's groups are built once.
        """
        if key not in self._group_positions:
            self._group_positions[key] = self._build_groups(key, m)
        return self._group_positions[key]

    def _build_groups(self, key: str, m: int) -> tuple[Tensor, Tensor]:
        adapter = self.layers[key]
        weight = weight_of(adapter)
        device = weight.device
        positions = torch.arange(weight.numel(), dtype=torch.float64, device=device)
        parts = {name: torch.full_like(getattr(adapter.module, name), -1.0, dtype=torch.float64)
                 for name in adapter.parameter_names}  # fmt: skip
        parts[adapter.key_parameter] = positions.reshape(weight.shape)
        canonical = adapter.to_canonical(parts).reshape(-1)
        where = torch.empty(weight.numel(), dtype=torch.long, device=device)
        located = (canonical >= 0).nonzero().squeeze(-1)
        where[canonical[located].long()] = located
        groups = torch.arange(weight.numel(), device=device).reshape(-1, m)
        return groups, where[groups]

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

    def sub_blocks(self, index: Tensor) -> Tensor:
        with torch.no_grad():
            return q_sub_blocks(self.block, index)

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


def _copy_state(block: CurvatureBlock) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in block.state_dict().items()}


def _finite_positive(values: Tensor) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(values).all()) and bool((values > 0).all())


def weight_of(adapter: LayerAdapter) -> Tensor:
    """The layer's pruned weight, detached."""
    weight: Tensor = getattr(adapter.module, adapter.key_parameter).detach()
    return weight


def _minibatch_gradients(per_batch: list[ExampleGradients], size: int) -> Tensor:
    """Mean gradients over consecutive groups of ``size`` examples, ``[m, d_out, d_in']``."""
    out = []
    for grads in per_batch:
        batch = grads.batch_size
        groups = math.ceil(batch / size)
        coefficients = torch.zeros(groups, batch, device=grads.parts()[0].device)
        for g in range(groups):
            members = slice(g * size, min((g + 1) * size, batch))
            coefficients[g, members] = 1.0 / (members.stop - members.start)
        out.append(grads.combine(coefficients))
    return torch.cat(out)


class InputHessian:
    """SparseGPT's curvature of one layer: ``H = Σ x xᵀ`` over its inputs, shared by every row.

    As an inverse curvature it is ``Q = I ⊗ (H + λI)⁻¹`` over the canonical matrix, with
    SparseGPT's dampening (:func:`~lightning_fls.sparsegpt.damped_hessian`), so saliencies and OBS
    updates can be read from it; the pruning itself is SparseGPT's column sweep.

    Args:
        hessian: ``[d_in', d_in']`` (float64).
        shape: The canonical shape ``(d_out, d_in')``.
    """

    def __init__(self, hessian: Tensor, shape: tuple[int, int]) -> None:
        self.hessian = hessian
        self.shape = shape

    @functools.cached_property
    def inverse(self) -> Tensor:
        """``(H + λI)⁻¹``, built on first use (SparseGPT's own sweep never needs it)."""
        root = damped_inverse_root(damped_hessian(self.hessian), 0.0)
        inverse: Tensor = root @ root.transpose(-1, -2)
        return inverse

    def qv(self, V: Tensor) -> Tensor:
        """``V (H + λI)⁻¹`` for ``V`` of shape ``[..., d_out, d_in']``."""
        out: Tensor = (V.to(self.inverse.dtype) @ self.inverse).to(V.dtype)
        return out

    def sub_blocks(self, index: Tensor) -> Tensor:
        """``Q[index[g, a], index[g, b]]``: ``(H + λI)⁻¹`` entries within a row, 0 across rows."""
        width = self.shape[1]
        rows, cols = index // width, index % width
        values = self.inverse[cols.unsqueeze(-1), cols.unsqueeze(-2)]
        same = rows.unsqueeze(-1) == rows.unsqueeze(-2)
        return torch.where(same, values, torch.zeros_like(values))

    def diag_q(self) -> Tensor:
        """``diag`` of ``(H + λI)⁻¹``, repeated for every row: ``[d_out, d_in']``."""
        diag: Tensor = self.inverse.diagonal().to(torch.float32)
        return diag.expand(self.shape[0], -1).clone()
