"""The options every pruning method shares, validated once for one-shot and gradual pruning.

A method's own options live on the method (:mod:`lightning_fls.methods`); an option that does not
apply to the chosen method is an error that names the method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, cast, get_args

from lightning_fls._validation import (
    check_choice,
    check_positive,
    check_positive_int,
    check_sparsity,
)
from lightning_fls.fishleg import Likelihood, get_likelihood
from lightning_fls.masks import Scope
from lightning_fls.methods import PruningMethod
from lightning_fls.patterns import NMPattern, parse_pattern

FisherKind = Literal["empirical", "sampled"]
"""``"empirical"`` (data labels) or ``"sampled"`` (labels drawn from the model: the true Fisher)."""
RowUpdate = Literal["auto", "joint", "refined_sweep", "sweep"]
"""How a Kronecker Q's joint OBS update is solved inside each row: ``"joint"`` exactly
(:func:`~lightning_fls.obs.kronecker_row_obs_update`), ``"sweep"`` by SparseGPT's column sweep
(:func:`~lightning_fls.obs.kronecker_sweep_obs_update`), ``"refined_sweep"``: the sweep, then
:data:`~lightning_fls.obs.SWEEP_REFINE_STEPS` conjugate-gradient steps towards the joint one, or
``"auto"``: per layer, exactly where that costs at most
:data:`~lightning_fls.obs.AUTO_JOINT_COST_RATIO` times the refined sweep's arithmetic, else the
refined sweep (:func:`~lightning_fls.obs.kronecker_auto_obs_update`)."""
DEFAULT_DAMPING = 1e-2
"""γ relative to the mean of diag F when ``damping`` is not given."""
DEFAULT_SAMPLES_PER_STEP = 1024
"""Calibration examples per recomputation step when ``samples_per_step`` is not given."""
LARGE_MODEL_WEIGHTS = 4_000_000
"""Above this many pruned weights, methods that read gradients default to their
:meth:`~lightning_fls.methods.PruningMethod.large_model_budget` (one-shot)."""
LARGE_MODEL_ONE_STEP_SPARSITY = 0.5
"""The highest sparsity (or N/M of a pattern) that a large model reaches in its budget's
``steps`` (:class:`~lightning_fls.calibration_budget.CalibrationBudget`); above it, in its
``high_sparsity_steps``."""


def scale_defaults(
    options: PruningOptions,
    weights: int,
    *,
    sparsity: float,
    steps: int | None,
    samples_per_step: int | None,
) -> PruningOptions:
    """The options with defaults fitted to the model's size (one-shot).

    A method that reads per-example gradients pays for its statistics per example and per step.
    On a model with more than :data:`LARGE_MODEL_WEIGHTS` pruned weights, the ``steps`` and
    ``samples_per_step`` the user left unset come from the method's
    :meth:`~lightning_fls.methods.PruningMethod.large_model_budget` (the budget's ``steps``, or
    its ``high_sparsity_steps`` when ``sparsity`` exceeds :data:`LARGE_MODEL_ONE_STEP_SPARSITY`,
    never more than the method's own default). Given values, and methods that read no
    gradients, are left alone.

    Args:
        options: Validated options.
        weights: Number of pruned weights.
        sparsity: The target sparsity.
        steps: The user's ``steps`` (None: unset).
        samples_per_step: The user's ``samples_per_step`` (None: unset).

    Returns:
        The options, possibly with smaller defaults.
    """
    if weights <= LARGE_MODEL_WEIGHTS or options.method.calibration != "gradients":
        return options
    budget = options.method.large_model_budget()
    large_steps = (
        budget.high_sparsity_steps if sparsity > LARGE_MODEL_ONE_STEP_SPARSITY else budget.steps
    )
    return dataclasses.replace(
        options,
        steps=min(options.steps, large_steps) if steps is None else options.steps,
        samples_per_step=budget.samples_per_step
        if samples_per_step is None
        else options.samples_per_step,
    )


@dataclass(frozen=True)
class PruningOptions:
    """Validated options shared by every method (see :func:`~lightning_fls.prune_one_shot`).

    Attributes:
        method: The method (a fresh instance, its own options set).
        scope: ``"global"`` or ``"layer"``.
        steps: Recomputation steps (one-shot) or OBS steps per pruning point (callback).
        samples_per_step: Calibration examples per step.
        fisher: The kind of Fisher for gradient-based methods.
        likelihood: The likelihood of the sampled Fisher (None for the empirical one).
        damping: γ relative to the mean of diag F (methods that use it).
        max_layer_sparsity: Cap on any layer's sparsity (global scope), or None.
        joint: Joint OBS inside Q's explicit blocks (a Kronecker Q: inside each row).
        row_update: With ``joint``, how a Kronecker Q's row update is solved (:data:`RowUpdate`).
        seed: Seed of random probes and sampled labels.
        progress: Show a progress bar.
        pattern: The N:M pattern, or None (unstructured).
    """

    method: PruningMethod
    scope: Scope
    steps: int
    samples_per_step: int
    fisher: FisherKind
    likelihood: Likelihood | None
    damping: float
    max_layer_sparsity: float | None
    joint: bool
    seed: int
    progress: bool
    pattern: NMPattern | None = None
    row_update: RowUpdate = "auto"

    @property
    def method_name(self) -> str:
        """The method's registered name (or its class name if it has none)."""
        return self.method.name or type(self.method).__name__


def build_options(
    method: PruningMethod,
    *,
    sparsity: float,
    pattern: str | NMPattern | None = None,
    scope: str | None = None,
    steps: int | None = None,
    samples_per_step: int | None = None,
    fisher: str = "empirical",
    likelihood: str | Likelihood | None = None,
    damping: float | None = None,
    max_layer_sparsity: float | None = None,
    joint: bool | None = None,
    row_update: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PruningOptions:
    """Validate the shared options against ``method`` (None: the method's default).

    Args:
        method: The resolved method (:func:`~lightning_fls.methods.resolve_method`).
        sparsity: The target sparsity, in ``[0, 1)``.
        pattern: ``"N:M"`` or None.
        scope: ``"global"``/``"layer"``, or None for the method's default.
        steps: Recomputation steps, or None for the method's default.
        samples_per_step: Calibration examples per step (>= 1), or None for 1024.
        fisher: ``"empirical"`` or ``"sampled"`` (gradient-based methods only).
        likelihood: For ``fisher="sampled"``: a name or a Likelihood.
        damping: γ relative to the mean of diag F (> 0), or None for 1e-2.
        max_layer_sparsity: Cap in ``(0, 1]``, or None.
        joint: Joint OBS inside Q's blocks, or None for the method's default.
        row_update: ``"auto"``, ``"joint"``, ``"refined_sweep"`` or ``"sweep"``
            (:data:`RowUpdate`), or None for ``"auto"``.
        seed: Random seed.
        progress: Show a progress bar.

    Returns:
        The options.

    Raises:
        ValueError: An out-of-range value, or an option that does not apply to ``method``
            (named in the message).
    """
    check_sparsity("sparsity", sparsity)
    name = method.name or type(method).__name__
    nm = parse_pattern(pattern)
    if nm is not None and sparsity > nm.sparsity + 1e-9:
        raise ValueError(
            f"`pattern` {nm} prunes {nm.n} of every {nm.m} weights, a sparsity of "
            f"{nm.sparsity:g}; the target sparsity {sparsity:g} is above it. Use "
            f"{nm.sparsity:g} for the exact pattern (or less, for a partial one)."
        )
    chosen_scope = cast(
        Scope, check_choice("scope", scope or method.default_scope, get_args(Scope))
    )
    if chosen_scope not in method.scopes:
        reason = f" ({method.scope_reason})" if method.scope_reason else ""
        accepted = " or ".join(f"scope={s!r}" for s in method.scopes)
        raise ValueError(f"`method={name!r}` accepts only {accepted}{reason}; pass {accepted}.")
    fisher = check_choice("fisher", fisher, get_args(FisherKind))
    chosen_likelihood = None
    if fisher == "sampled":
        if method.calibration != "gradients":
            raise ValueError(
                f"`fisher='sampled'` does not apply to method={name!r}, which reads "
                f"{'no data' if method.calibration == 'none' else 'layer inputs only'}."
            )
        if likelihood is None:
            raise ValueError(
                "`fisher='sampled'` needs `likelihood` (one of 'categorical', 'bernoulli', "
                "'gaussian', or a Likelihood instance)."
            )
        chosen_likelihood = get_likelihood(likelihood)
    if damping is not None and not method.uses_damping:
        raise ValueError(
            f"`damping` does not apply to method={name!r} (it uses no Fisher damping"
            + (f"; its own options: {sorted(method.option_values())}" if method.option_values()
               else "")
            + ")."
        )  # fmt: skip
    if joint is not None and method.default_joint is None:
        raise ValueError(
            f"`joint` does not apply to method={name!r}: its Q has no explicit blocks to solve "
            "jointly."
        )
    chosen_joint = bool(method.default_joint if joint is None else joint)
    if row_update is not None:
        check_choice("row_update", row_update, get_args(RowUpdate))
        if not chosen_joint:
            raise ValueError(
                f"`row_update` does not apply to method={name!r}"
                + (" with `joint=False`" if method.default_joint is not None else "")
                + ": it chooses how the joint OBS update inside each row of a Kronecker Q is "
                "solved."
            )
    if max_layer_sparsity is not None and not 0.0 < max_layer_sparsity <= 1.0:
        raise ValueError(f"`max_layer_sparsity` must be in (0, 1], got {max_layer_sparsity!r}.")
    return PruningOptions(
        method=method,
        scope=chosen_scope,
        steps=check_positive_int("steps", method.default_steps if steps is None else steps),
        samples_per_step=check_positive_int(
            "samples_per_step",
            DEFAULT_SAMPLES_PER_STEP if samples_per_step is None else samples_per_step,
        ),
        fisher=fisher,  # type: ignore[arg-type]
        likelihood=chosen_likelihood,
        damping=check_positive("damping", DEFAULT_DAMPING if damping is None else damping),
        max_layer_sparsity=max_layer_sparsity,
        joint=chosen_joint,
        seed=int(seed),
        progress=bool(progress),
        pattern=nm,
        row_update=cast(RowUpdate, row_update or "auto"),
    )
