"""Sparsity schedules: the target sparsity as a function of training progress.

Progress ``t`` is measured in epochs completed (a float when pruning every ``n`` steps:
``t = global_step / steps_per_epoch``). Pruning runs between ``t = start`` and ``t = end`` and
reaches the final sparsity ``s_f`` at ``t = end``, i.e. by the start of epoch ``end``:

* ``"cubic"`` (Zhu & Gupta, 2017): ``s(t) = s_f + (s_i − s_f)(1 − (t − start)/(end − start))³``,
  fast pruning early, while the network can still recover, and gentle near the end;
* ``"linear"``: ``s(t) = s_i + (s_f − s_i)(t − start)/(end − start)``;
* ``"oneshot"``: ``s_f`` from the first pruning point on;
* a callable ``epoch → sparsity`` (values in ``[0, 1)``, never decreasing).

Before ``start`` the sparsity is ``s_i`` (0 unless the model arrives pruned); after ``end`` it
stays at ``s_f``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

from lightning_fls._validation import check_choice, check_sparsity

ScheduleName = Literal["cubic", "linear", "oneshot"]
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)
ScheduleFn = Callable[[float], float]
Schedule = ScheduleName | ScheduleFn


def cubic_sparsity(t: float, start: float, end: float, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule at progress ``t`` (clamped to ``[start, end]``)."""
    fraction = _fraction(t, start, end)
    return final + (initial - final) * (1.0 - fraction) ** 3


def linear_sparsity(
    t: float, start: float, end: float, final: float, initial: float = 0.0
) -> float:
    """The linear schedule at progress ``t`` (clamped to ``[start, end]``)."""
    return initial + (final - initial) * _fraction(t, start, end)


def geometric_steps(sparsity: float, steps: int) -> list[float]:
    """One-shot recomputation targets: ``s_i = 1 − (1 − s)^{i/k}``, ``i = 1 … k``.

    Each step removes the same fraction of the surviving weights, so late steps, when the
    remaining weights matter more, remove fewer in absolute number.

    Args:
        sparsity: The final sparsity ``s``.
        steps: The number of steps ``k`` (>= 1).

    Returns:
        The ``k`` targets, increasing, the last equal to ``s``.
    """
    return [1.0 - (1.0 - sparsity) ** ((i + 1) / steps) for i in range(steps)]


def linear_steps(current: float, target: float, steps: int) -> list[float]:
    """Targets of ``steps`` equal increments from ``current`` to ``target`` (a pruning point).

    Args:
        current: The sparsity now.
        target: The sparsity to reach.
        steps: The number of steps (>= 1).

    Returns:
        ``current + (target − current)·i/steps`` for ``i = 1 … steps``.
    """
    return [current + (target - current) * (i + 1) / steps for i in range(steps)]


def _fraction(t: float, start: float, end: float) -> float:
    if end <= start:
        return 1.0 if t >= start else 0.0
    return min(max((t - start) / (end - start), 0.0), 1.0)


class SparsitySchedule:
    """Target sparsity at each pruning point.

    Args:
        schedule: ``"cubic"``, ``"linear"``, ``"oneshot"``, or a callable ``epoch → sparsity``.
        target_sparsity: Final sparsity ``s_f`` in ``[0, 1)`` (ignored by a callable).
        start: Progress (epochs) of the first pruning point.
        end: Progress (epochs) by which ``s_f`` is reached (``> start``).
        initial_sparsity: ``s_i``, the sparsity the schedule starts from.

    Raises:
        ValueError: For an unknown schedule name, a sparsity outside ``[0, 1)``, or
            ``end <= start``.
    """

    def __init__(
        self,
        schedule: Schedule,
        target_sparsity: float,
        start: float,
        end: float,
        initial_sparsity: float = 0.0,
    ) -> None:
        if not callable(schedule):
            check_choice("schedule", schedule, SCHEDULES)
        check_sparsity("target_sparsity", target_sparsity)
        check_sparsity("initial_sparsity", initial_sparsity)
        if end <= start:
            raise ValueError(f"`end_epoch` ({end}) must be greater than `start_epoch` ({start}).")
        self.schedule = schedule
        self.target = float(target_sparsity)
        self.start = float(start)
        self.end = float(end)
        self.initial = float(initial_sparsity)

    def __call__(self, t: float) -> float:
        """Target sparsity at progress ``t`` (epochs completed)."""
        if callable(self.schedule):
            value = self.schedule(t)
            return check_sparsity(f"schedule({t:g})", value)
        if t < self.start:
            return self.initial
        if self.schedule == "oneshot":
            return self.target
        if self.schedule == "linear":
            return linear_sparsity(t, self.start, self.end, self.target, self.initial)
        return cubic_sparsity(t, self.start, self.end, self.target, self.initial)

    def is_pruning_point(self, t: float) -> bool:
        """Whether progress ``t`` lies in the pruning window ``[start, end]``."""
        if callable(self.schedule):
            return True
        return self.start <= t <= self.end + 1e-9

    def check(self, points: list[float]) -> None:
        """Check that the schedule gives values in ``[0, 1)`` that never decrease at ``points``.

        Raises:
            ValueError: Naming the first point where it does not.
        """
        previous = -math.inf
        for t in points:
            value = self(t)
            if value < previous - 1e-12:
                raise ValueError(
                    f"`schedule` must never decrease (masks are monotone): it gives {previous:g} "
                    f"before and {value:g} at epoch {t:g}."
                )
            previous = value
