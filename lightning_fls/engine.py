"""The pruning engine shared by :func:`~lightning_fls.prune_one_shot` and the callback.

Given one step's calibration data (:class:`~lightning_fls.calibration.StepData`), a
:class:`PruningEngine` asks its method (:mod:`lightning_fls.methods`) for each layer's
inverse-curvature estimate ``Q ≈ (F + γI)⁻¹`` and takes one OBS step to a target sparsity:
saliencies ``ρ = w²/(2[Q]_qq)``, mask selection (:mod:`lightning_fls.masks`), the OBS correction
of the survivors (:mod:`lightning_fls.obs`) and hard zeros, the same for every method (a method
with a step of its own overrides it). It holds the masks, keyed by the pruned weight's
fully-qualified name. Where the data come from is the caller's business: ``prune_one_shot``
draws batches from a dataloader, the callback records the training step's own backward. The
engine has no branch on a method's name: it reads the method's declared capabilities.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_fls._linalg import FallbackCounter
from lightning_fls.calibration import GradientStream, StepData
from lightning_fls.fishleg import relative_damping
from lightning_fls.fishleg.objective import damping_from_traces
from lightning_fls.layers import LayerAdapter
from lightning_fls.masks import select_masks
from lightning_fls.methods import PruningMethod
from lightning_fls.obs import (
    SWEEP_REFINE_STEPS,
    BlockCurvature,
    CachingCurvature,
    InverseCurvature,
    KroneckerCurvature,
    ObsUpdate,
    choose_group_prunes,
    group_obs_update,
    joint_block_obs_update,
    joint_kronecker_obs_update,
    kronecker_auto_obs_update,
    kronecker_row_obs_update,
    kronecker_sweep_obs_update,
    obs_saliency,
    obs_update,
    q_sub_blocks,
)
from lightning_fls.options import PruningOptions, RowUpdate
from lightning_fls.patterns import check_fits
from lightning_fls.safeguard import (
    LossProbe,
    Snapshot,
    StepOutcome,
    check_step,
    record,
    snapshot,
    warn_reverted,
)
from lightning_fls.structured.saliency import StructuredUnits, select_units, unit_saliencies

DAMPING_RAISE = 10.0
"""Factor by which γ is raised after the auxiliary fit diverged, or after an OBS step whose
corrections did worse than plain zeroing (:mod:`lightning_fls.safeguard`)."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class PruningEngine:
    """Curvature estimates and OBS steps for a fixed set of layers, holding their masks.

    Args:
        layers: Adapters of the layers to prune, keyed by weight name.
        options: Validated options (:func:`~lightning_fls.options.build_options`); the engine
            works on its own copy of ``options.method``.
        device: Device of the model.

    Attributes:
        masks: ``True`` = kept, by weight name, shaped like the weights. Weights that are zero
            at construction count as pruned.
        damping_scale: Factor on the relative damping (1, times :data:`DAMPING_RAISE` after
            each divergence of the auxiliary fit or safeguard revert).
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
        self.generator = torch.Generator().manual_seed(options.seed)
        self.damping_scale = 1.0
        self.rollbacks = 0
        self.skipped_aux_updates = 0
        self.factorisation_fallbacks = 0
        self.safeguard_reverts = 0
        self._method = options.method.fresh()
        self._method.start(self)

    @property
    def method(self) -> PruningMethod:
        """The engine's own copy of the method (it holds the method's run state)."""
        return self._method

    def raise_damping(self) -> None:
        """Raise the damping of later estimates by :data:`DAMPING_RAISE`."""
        self.damping_scale *= DAMPING_RAISE

    def aux_loss(self, step: StepData, gamma: float) -> float | None:
        """The method's auxiliary loss on ``step``, for logging (None for most methods)."""
        return self._method.aux_loss(self, step, gamma)

    def curvature(
        self, step: StepData | None
    ) -> tuple[dict[str, InverseCurvature], int, float, float]:
        """Each layer's inverse-curvature estimate from one step's calibration data.

        Args:
            step: The step's data (may be None for a method that reads none).

        Returns:
            ``(estimates by weight name, samples used, γ (absolute), estimate state in MB)``.

        Raises:
            ValueError: If the method needs data and ``step`` holds none.
        """
        method = self._method
        if step is None:
            step = StepData()
        if method.calibration == "gradients" and not step.batches and step.statistics is None:
            raise ValueError(
                f"method={self.options.method_name!r} needs gradients, and none were recorded."
            )
        if method.calibration == "inputs" and step.input_hessians is None and not step.batches:
            raise ValueError(
                f"method={self.options.method_name!r} needs layer inputs, and none were recorded."
            )
        gamma = self.damping(step)
        estimates, mb = self._estimate(step, gamma)
        return estimates, step.samples, gamma, mb

    def damping(self, step: StepData) -> float:
        """The absolute γ of a step: the relative ``damping`` times the mean of ``diag F``.

        From the step's summed Fisher traces (streamed steps) or its recorded gradients,
        times :attr:`damping_scale`; 0 for a method that uses no damping.
        """
        if not self._method.uses_damping:
            return 0.0
        if step.traces is not None:
            sizes = {key: math.prod(a.canonical_shape) for key, a in self.layers.items()}
            traces = {key: total / step.samples for key, total in step.traces.items()}
            damping = damping_from_traces(traces, sizes, self.options.damping)
        else:
            damping = relative_damping(step.batches, self.options.damping)
        return next(iter(damping.values())) * self.damping_scale

    def _estimate(self, step: StepData, gamma: float) -> tuple[dict[str, InverseCurvature], float]:
        with FallbackCounter() as fallbacks:
            estimates, mb = self._method.estimate(self, step, gamma)
        self._count_fallbacks(fallbacks.count, "estimate")
        return estimates, mb

    def _count_fallbacks(self, count: int, where: str) -> None:
        if not count:
            return
        self.factorisation_fallbacks += count
        warnings.warn(
            f"{count} matri{'x' if count == 1 else 'ces'} of the {self.options.method_name} "
            f"{where} could not be factorised by Cholesky in float64 and went through an "
            "eigenvalue floor instead (counted in `factorisation_fallbacks`). The curvature data "
            "are close to singular: a larger `damping` avoids this.",
            RuntimeWarning,
            stacklevel=3,
        )

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
        prune = functools.partial(self._obs, self._prune_step, curvature, target)
        return self._checked(prune, loss)

    def grouped_step(
        self,
        collect: Callable[[GradientStream | None, int, bool], StepData],
        groups: Sequence[Sequence[str]],
        target: float,
        loss: LossProbe | None = None,
    ) -> tuple[StepOutcome, int, float, float]:
        """Prune to ``target`` holding one layer group's estimates at a time.

        For a method with :meth:`~lightning_fls.methods.PruningMethod.layer_group_bytes`
        (:mod:`lightning_fls.layer_groups`): each group's estimates are built from its own
        stream and give its saliencies; the masks are chosen from all saliencies at once; then
        each group's estimates are rebuilt (the last group's are still held) for its OBS
        corrections, which reach the model only after the last group, so every group's
        statistics see the same weights. The outcome equals :meth:`curvature` then
        :meth:`prune_step` over all layers at once.

        Args:
            collect: ``collect(stream, i, first)`` runs the step's calibration batches (the
                same batches and sampled labels every call) into ``stream``, the statistics of
                group ``i``, and returns the step's data; the ``first`` call (group 0) draws
                the batches and its Fisher traces must cover every layer (they set γ).
            groups: Weight names in groups, every pruned layer in exactly one.
            target: The sparsity to reach.
            loss: Optional probe of the calibration loss (:meth:`prune_step`).

        Returns:
            ``(outcome, samples used, γ, largest group's estimate state in MB)``.
        """
        method = self._method
        found = {"samples": 0, "gamma": 0.0, "mb": 0.0}

        def estimate(i: int, first: bool = False) -> dict[str, InverseCurvature]:
            step = collect(method.stream(self, groups[i]), i, first)
            if first:
                found["samples"], found["gamma"] = step.samples, self.damping(step)
            estimates, mb = self._estimate(step, found["gamma"])
            found["mb"] = max(found["mb"], mb)
            return estimates

        # The first pass draws the step's batches: before the loss probe, which reads them.
        first: dict[str, InverseCurvature] | None = estimate(0, first=True)
        # The model keeps its weights until every correction is known, so the safeguard's copy
        # of a layer is taken as its correction is written, and the pending corrections and
        # that copy are never both whole-model sized.
        before = Snapshot()

        def prune() -> float:
            nonlocal first
            saliency: dict[str, Tensor] = {}
            for i in range(len(groups)):
                estimates = first if first is not None else estimate(i)
                first = None
                with torch.no_grad():
                    saliency.update(self._saliencies(estimates))
                if i < len(groups) - 1:
                    del estimates  # this group's Q goes before the next group's statistics
            new_masks = self._select(saliency, target)
            del saliency  # one float per weight of the model: not held through the corrections
            pending: dict[str, Tensor] = {}
            predicted = self._obs(self._correct, estimates, new_masks, target, pending)
            del estimates
            for i in range(len(groups) - 1):
                predicted += self._obs(self._correct, estimate(i), new_masks, target, pending)
            for key in list(pending):
                if loss is not None:
                    record(before, key, self.layers[key])
                keep = self.canonical_mask(key)
                weight = pending[key].new_zeros(keep.shape)
                weight[keep] = pending.pop(key)
                self.layers[key].set_canonical_weight(weight)
            return predicted

        outcome = self._checked(prune, loss, before=before)
        return outcome, int(found["samples"]), found["gamma"], found["mb"]

    def structured_step(
        self,
        curvature: Mapping[str, InverseCurvature],
        target: float,
        units: StructuredUnits,
        loss: LossProbe | None = None,
    ) -> StepOutcome:
        """Remove whole units (neurons, channels, heads) until ``target`` of them are gone.

        Each unit's cost is the group OBS saliency ``½ w_Sᵀ ([Q]_SS)⁻¹ w_S`` over every entry
        it owns (:func:`~lightning_fls.structured.saliency.unit_saliencies`). The cheapest
        units go, ranked over all families at once, each family keeping at least one unit (and
        at most ``max_layer_sparsity`` of its units removed). The survivors of each layer get
        the joint OBS correction inside Q's blocks (block-diagonal estimates), the exact joint
        one of a Kronecker Q where the layer loses only whole rows or only whole columns, or
        the sum-of-singles one, and every entry of a removed unit ends exactly at zero, its bias
        included. Checked against ``loss`` as :meth:`prune_step`.

        Args:
            curvature: Each layer's estimate (:meth:`curvature`).
            target: The fraction of units to have removed.
            units: The families' positions and which units are removed (updated in place).
            loss: Optional probe of the calibration loss.

        Returns:
            The step's predicted and (with ``loss``) realised loss increase.
        """
        prune = functools.partial(self._obs, self._remove_units, curvature, target, units)
        return self._checked(prune, loss, functools.partial(self.unit_masks, units))

    def unit_masks(self, units: StructuredUnits) -> dict[str, Tensor | dict[str, Tensor]]:
        """Every pruned layer's masks; per parameter (bias included) where a unit is removed.

        Args:
            units: The families and their removed units.

        Returns:
            By layer key: the weight's mask, or ``{attribute: mask}`` for a layer some family
            touches (its removed units' weights and bias entries ``False``).
        """
        masks: dict[str, Tensor | dict[str, Tensor]] = dict(self.masks)
        for key, positions in units.entries(units.removed).items():
            keep = self._canonical_keep(key, positions)
            masks[key] = {n: m.bool() for n, m in self.layers[key].from_canonical(keep).items()}
        return masks

    def _canonical_keep(self, key: str, removed: Tensor) -> Tensor:
        """A copy of the layer's canonical mask with the flat positions ``removed`` pruned too.

        (A copy: without a bias column the canonical mask is the weight's own mask.)
        """
        keep = self.canonical_mask(key).clone()
        keep.view(-1)[removed.to(keep.device)] = False
        return keep

    @torch.no_grad()
    def _remove_units(
        self, curvature: Mapping[str, InverseCurvature], target: float, units: StructuredUnits
    ) -> float:
        weights = {key: self.layers[key].canonical_weight() for key in units.layer_keys()}
        saliency = [unit_saliencies(layout, weights, curvature) for layout in units.layouts]
        units.check_reachable(target, self.options.max_layer_sparsity)
        caps = units.caps(self.options.max_layer_sparsity)
        kept = select_units(saliency, [~r for r in units.removed], caps, target)
        newly = [~old & ~k for old, k in zip(units.removed, kept, strict=True)]
        units.removed = [~k for k in kept]
        gone = units.entries(units.removed)
        fresh = units.entries(newly)
        predicted = 0.0
        for key, positions in fresh.items():
            if positions.numel() == 0:
                continue
            adapter = self.layers[key]
            weight = weights[key]
            prune = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            prune[positions.to(weight.device)] = True
            prune = prune.reshape(weight.shape)
            keep = self._canonical_keep(key, gone[key])
            estimate = curvature[key]
            factors = (
                estimate.kronecker_factors() if isinstance(estimate, KroneckerCurvature) else None
            )
            joint = None
            if self._method.corrects and factors is not None:
                joint = joint_kronecker_obs_update(weight, factors, keep)
            if joint is not None:
                update = joint
            elif not self._method.corrects:
                update = obs_update(weight, estimate, prune, keep, correct=False)
            elif isinstance(estimate, BlockCurvature):
                update = joint_block_obs_update(weight, estimate, prune, keep)
            else:
                update = obs_update(weight, estimate, prune, keep)
            predicted += update.predicted_increase
            _release(estimate)
            adapter.set_canonical_weight(update.weight)
            parts = adapter.from_canonical(keep)
            self.masks[key] = parts[adapter.key_parameter].bool() & self.masks[key]
        for estimate in curvature.values():  # also the layers with nothing newly pruned
            _release(estimate)
        return predicted

    def _checked(
        self,
        prune: Callable[[], float],
        loss: LossProbe | None,
        masks: Callable[[], Mapping[str, Tensor | Mapping[str, Tensor]]] | None = None,
        before: Snapshot | None = None,
    ) -> StepOutcome:
        """Run ``prune`` (returns the predicted increase), checked against ``loss``.

        ``masks`` gives the masks a reverted layer is zeroed with (default: :attr:`masks`).
        ``before`` is the snapshot ``prune`` fills itself, each layer just before it first
        writes it (:func:`~lightning_fls.safeguard.record`); by default a copy of every layer
        is taken here before ``prune`` runs. Either is kept in a temporary file
        (:class:`~lightning_fls.safeguard.Snapshot`), deleted once the step is checked.
        """
        before_step = (
            Snapshot() if loss is None else snapshot(self.layers) if before is None else before
        )
        with before_step:  # its file deleted once the step is checked
            loss_before = loss() if loss is not None else None
            predicted = prune()
            if loss is None or loss_before is None:
                return StepOutcome(predicted)
            after = self.masks if masks is None else masks()
            outcome = check_step(self.layers, after, before_step, loss_before, loss, predicted)
        if outcome.reverted:
            self.safeguard_reverts += len(outcome.reverted)
            self.raise_damping()
            warn_reverted(outcome, self.options.method_name, self.damping_scale)
        return outcome

    def _obs(self, step: Callable[..., float], *args: Any) -> float:
        """``step(*args)`` without autograd, its factorisation fallbacks counted."""
        with FallbackCounter() as fallbacks, torch.no_grad():
            predicted = step(*args)
        self._count_fallbacks(fallbacks.count, "OBS solve")
        return predicted

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
        own = self._method.prune(self, curvature, target)
        if own is not None:
            return own
        new_masks = self._select(self._saliencies(curvature), target)
        return self._correct(curvature, new_masks, target)

    def _saliencies(self, curvature: Mapping[str, InverseCurvature]) -> dict[str, Tensor]:
        """``ρ = w²/(2[Q]_qq)`` of the layers in ``curvature``, shaped like their weights.

        Computed in float64, kept in float32: the ranking needs one float per weight of the
        whole model (and :func:`~lightning_fls.masks.select_masks` one order key of the same
        width), so float64 would double the only model-sized buffers of a layer-group step.
        """
        saliency = {}
        for key, estimate in curvature.items():
            adapter = self.layers[key]
            canonical = obs_saliency(adapter.canonical_weight(), estimate.diag_q())
            ranked = adapter.from_canonical(canonical)[adapter.key_parameter]
            saliency[key] = ranked.to(torch.float32)
        return saliency

    def _select(self, saliency: Mapping[str, Tensor], target: float) -> dict[str, Tensor]:
        """The masks at ``target`` from every layer's saliencies (scope, caps, N:M)."""
        opts = self.options
        return select_masks(
            dict(saliency),
            self.masks,
            target,
            scope=opts.scope,
            max_layer_sparsity=opts.max_layer_sparsity,
            pattern=opts.pattern,
        )

    def _correct(
        self,
        curvature: Mapping[str, InverseCurvature],
        new_masks: dict[str, Tensor],
        target: float,
        pending: dict[str, Tensor] | None = None,
    ) -> float:
        """Take the layers in ``curvature`` to ``new_masks`` with their OBS corrections.

        Args:
            curvature: The estimates of the layers to prune now.
            new_masks: The step's masks (:meth:`_select`); at an N:M pattern's own sparsity
                each group's set is chosen here instead, by its joint OBS cost.
            target: The step's target sparsity.
            pending: Where to put the corrected canonical weights instead of writing them to
                the model (None: written at once), as their surviving entries only (``W[keep]``,
                ``keep`` the layer's canonical mask after the step): at 50% sparsity half the
                memory of the weights held until every layer group is done.

        Returns:
            The predicted loss increase of the newly pruned weights.
        """
        opts = self.options
        pattern = opts.pattern
        method = self._method
        fill = pattern is not None and target >= pattern.sparsity - 1e-9
        predicted = 0.0
        for key, estimate in curvature.items():
            adapter = self.layers[key]
            weight = adapter.canonical_weight()
            groups = index = sub_blocks = None
            if pattern is not None:
                groups, index = self._groups(key, pattern.m)
                if fill and method.corrects:
                    # Every group fills up: choose each group's set by its joint OBS cost.
                    sub_blocks = q_sub_blocks(estimate, index)
                    before = ~self.masks[key].reshape(-1)[groups]
                    chosen = choose_group_prunes(
                        weight.reshape(-1)[index], before, sub_blocks, pattern.n
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
            if not method.corrects:
                update = obs_update(weight, estimate, prune, keep, correct=False)
            elif opts.joint and isinstance(estimate, BlockCurvature):
                update = joint_block_obs_update(weight, estimate, prune, keep)
            elif (
                opts.joint
                and (rows := _row_update(estimate, weight, keep, opts.row_update)) is not None
            ):
                update = rows
            elif pattern is not None and groups is not None and index is not None:
                pruned = ~self.masks[key].reshape(-1)[groups]
                update = group_obs_update(weight, estimate, index, pruned, keep, sub_blocks)
            else:
                update = obs_update(weight, estimate, prune, keep)
            predicted += update.predicted_increase
            _release(estimate)
            if pending is not None:  # only the surviving entries: the pruned ones are zero
                pending[key] = update.weight[keep.bool()]
            else:
                adapter.set_canonical_weight(update.weight)
        for estimate in curvature.values():  # also the layers with nothing newly pruned
            _release(estimate)
        return predicted

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
        where = adapter.canonical_positions(adapter.key_parameter).reshape(-1).to(weight.device)
        groups = torch.arange(weight.numel(), device=weight.device).reshape(-1, m)
        return groups, where[groups]

    def _canonical_from_weight(self, key: str, weight_part: Tensor) -> Tensor:
        adapter = self.layers[key]
        parts = {name: torch.zeros_like(getattr(adapter.module, name), dtype=torch.bool)
                 for name in adapter.parameter_names}  # fmt: skip
        parts[adapter.key_parameter] = weight_part
        return adapter.to_canonical(parts)


def weight_of(adapter: LayerAdapter) -> Tensor:
    """The layer's pruned weight, detached."""
    weight: Tensor = getattr(adapter.module, adapter.key_parameter).detach()
    return weight


RowSolver = Callable[[Tensor, tuple[Tensor, Tensor, float], Tensor], ObsUpdate | None]
"""``(weight, (G_o, G_i, c), keep) → update``, a Kronecker Q's update inside each row."""

ROW_UPDATES: dict[RowUpdate, RowSolver] = {
    "auto": kronecker_auto_obs_update,
    "joint": kronecker_row_obs_update,
    "refined_sweep": functools.partial(kronecker_sweep_obs_update, refine_steps=SWEEP_REFINE_STEPS),
    "sweep": kronecker_sweep_obs_update,
}
"""The solver of each :data:`~lightning_fls.options.RowUpdate`."""


def _release(estimate: InverseCurvature) -> None:
    """Free what a layer's estimate keeps once its correction is done (and at the step's end).

    A Kronecker estimate keeps its Gram matrices (``d_out² + d_in'²`` floats, as large as its
    factors) from the step's first use to the last; kept for every layer until the step ends
    they were 0.8× the largest layer's block-diagonal Q on a 4-layer 512-wide BERT.
    """
    if isinstance(estimate, CachingCurvature):
        estimate.release_cache()


def _row_update(
    estimate: InverseCurvature, weight: Tensor, keep: Tensor, how: RowUpdate
) -> ObsUpdate | None:
    """The update inside each row of a Kronecker ``Q``, solved ``how`` (None for another ``Q``)."""
    if not isinstance(estimate, KroneckerCurvature):
        return None
    factors = estimate.kronecker_factors()
    return None if factors is None else ROW_UPDATES[how](weight, factors, keep)
