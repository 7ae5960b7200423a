r"""The realised-versus-predicted check of an OBS step, and its remedy.

OBS predicts the loss increase of a step from a local quadratic model, ``½ δᵀ F δ`` with the
step's curvature estimate. After each step the loss on the calibration batches is measured again
and compared with that prediction. Two facts, measured on the ill-conditioned tasks of
``benchmarks.oneshot_quality``, shape the rule:

* On a model that fits its calibration data almost perfectly, the empirical Fisher is tiny and
  **every** method's prediction is 10–1000× below the realised increase, on steps that do no
  harm. So a large ratio alone is no sign of a fault.
* A step goes wrong when the correction itself hurts: ``Q`` trusts directions in which the
  Fisher is nearly zero (too little damping, a Fisher carried by a handful of examples) and
  moves the surviving weights far along them. Then the corrected step is *worse* than zeroing
  the same weights with no correction at all (``Q → I/γ``, the large-damping limit).

So a step whose realised increase is more than :data:`SAFEGUARD_RATIO` times its prediction, and
more than :data:`SAFEGUARD_MIN_INCREASE` of the loss itself, is checked against the uncorrected
alternative. If zeroing alone is better on the calibration
batches, the layers whose correction hurt are found one at a time (each one's correction undone
where that lowers the loss), named in a warning, and left uncorrected for this step; the damping
of later steps is raised by :data:`~lightning_fls.engine.DAMPING_RAISE`, the remedy the warning
also names for a re-run. Masks are never changed by the check: the step always reaches its target.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_fls._parameter_store import ParameterStore
from lightning_fls.layers import LayerAdapter

SAFEGUARD_RATIO = 10.0
"""A step is checked when its realised loss increase exceeds this multiple of its prediction…"""

SAFEGUARD_MIN_INCREASE = 0.01
"""…and this fraction of the loss before the step: smaller changes are harmless whatever the
ratio (measured: on a model that fits its data, early steps change the loss by ~10⁻⁴ of itself
at 10–100× their tiny prediction, and undoing them only pushed later damping up)."""

LossProbe = Callable[[], "float | None"]
"""The mean loss on the calibration batches with the model's current weights (no gradients)."""

Snapshot = ParameterStore
"""Copies of layers' parameters before a step, by layer key (in a temporary file)."""


@dataclass
class StepOutcome:
    """What one OBS step did, as measured on the calibration batches.

    Attributes:
        predicted: The step's predicted loss increase.
        realised: The realised increase of the calibration loss after the step (and after any
            remedy); None without a loss probe.
        ratio: ``realised / predicted`` before any remedy (None where undefined).
        reverted: Layers whose OBS correction was undone because it raised the loss above
            plain zeroing of the same weights.
    """

    predicted: float
    realised: float | None = None
    ratio: float | None = None
    reverted: list[str] = field(default_factory=list)


def snapshot(layers: Mapping[str, LayerAdapter]) -> Snapshot:
    """A copy of every pruned layer's parameters (weight, bias), by layer key, on disk."""
    before = ParameterStore()
    for key, adapter in layers.items():
        record(before, key, adapter)
    return before


def record(before: Snapshot, key: str, adapter: LayerAdapter) -> None:
    """Add a copy of one layer's parameters to ``before`` (nothing if it is already there).

    A step that writes its layers one at a time can record each just before its first write,
    so that the copies and the step's pending results are never both whole-model sized.
    """
    if key not in before:
        before[key] = {name: getattr(adapter.module, name) for name in adapter.parameter_names}


@torch.no_grad()
def load(adapter: LayerAdapter, values: Mapping[str, Tensor]) -> None:
    """Copy saved parameter values back into a layer."""
    for name, value in values.items():
        getattr(adapter.module, name).copy_(value)


@torch.no_grad()
def check_step(
    layers: Mapping[str, LayerAdapter],
    masks: Mapping[str, Tensor | Mapping[str, Tensor]],
    before_step: Snapshot,
    loss_before: float,
    loss: LossProbe,
    predicted: float,
) -> StepOutcome:
    """Compare a step's realised loss increase with its prediction; undo harmful corrections.

    Args:
        layers: The pruned layers (their weights hold the step's result).
        masks: The masks after the step (``True`` = kept), by layer key: of the pruned weight,
            or of each of the layer's parameters by attribute name (a structured step also
            zeroes the removed units' biases).
        before_step: The layers' parameters before the step (:func:`snapshot`, :func:`record`).
            A layer absent from it was not changed by the step, and is left alone.
        loss_before: The calibration loss before the step.
        loss: Measures the calibration loss with the current weights.
        predicted: The step's predicted loss increase.

    Returns:
        The outcome; the layers hold the final weights.
    """
    after = loss()
    if after is None:
        return StepOutcome(predicted)
    realised = after - loss_before
    ratio = realised / predicted if predicted > 0 else None
    threshold = max(SAFEGUARD_RATIO * predicted, SAFEGUARD_MIN_INCREASE * abs(loss_before))
    if realised <= threshold:
        return StepOutcome(predicted, realised, ratio)
    stepped = {key: layers[key] for key in layers if key in before_step}
    with snapshot(stepped) as corrected:  # closed (its file deleted) on every return

        def uncorrected(key: str) -> dict[str, Tensor]:  # made when needed: one layer at a time
            return _zeroed(layers[key], before_step[key], masks[key])

        changed = [key for key in stepped if _differ(corrected[key], uncorrected(key))]
        if not changed:  # nothing was corrected (magnitude): nothing to undo
            return StepOutcome(predicted, realised, ratio)
        for key in changed:
            load(layers[key], uncorrected(key))
        plain = loss()
        if plain is None or plain >= after:  # the corrections help on the whole: keep them all
            for key in changed:
                load(layers[key], corrected[key])
            return StepOutcome(predicted, realised, ratio)
        # Zeroing alone is better: find the layers whose correction hurts, one at a time.
        for key in changed:
            load(layers[key], corrected[key])
        current, reverted = after, []
        for key in changed:
            load(layers[key], uncorrected(key))
            trial = loss()
            if trial is not None and trial < current:
                current = trial
                reverted.append(key)
            else:
                load(layers[key], corrected[key])
        return StepOutcome(predicted, current - loss_before, ratio, reverted)


def warn_reverted(outcome: StepOutcome, method: str, damping_scale: float) -> None:
    """The warning for a step whose corrections were undone: which layers, and the remedy."""
    ratio = "" if outcome.ratio is None else f", {outcome.ratio:.3g}× the predicted"
    names = ", ".join(f"`{key}`" for key in outcome.reverted)
    warnings.warn(
        f"An OBS step of method={method!r} raised the calibration loss far above its prediction "
        f"({outcome.predicted:.3g} predicted{ratio}), and its weight correction in {names} did "
        "worse than zeroing the pruned weights alone: the curvature estimate trusts directions "
        "the calibration data barely constrain. Those corrections were undone for this step "
        f"and the damping of later steps raised (now {damping_scale:g}× the configured value). "
        "If this repeats, pass a larger `damping` (e.g. 10× the current one), more `steps` "
        "(smaller steps), or more calibration samples.",
        RuntimeWarning,
        stacklevel=3,
    )


def _differ(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


def _zeroed(
    adapter: LayerAdapter, values: Mapping[str, Tensor], mask: Tensor | Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The layer's pre-step parameters with the newly pruned entries zeroed, no correction."""
    out = dict(values)  # a fresh copy from the snapshot: the masked entries are new tensors
    by_name = {adapter.key_parameter: mask} if isinstance(mask, Tensor) else mask
    for name, keep in by_name.items():
        out[name] = out[name] * keep
    return out
