"""The interface every pruning method implements, and the registry of methods by name.

A method turns one recomputation step's calibration data (:class:`~lightning_fls.calibration.
StepData`) into each layer's inverse-curvature estimate ``Q ≈ (F + γI)⁻¹`` (anything with
``qv``/``diag_q``, :class:`~lightning_fls.obs.InverseCurvature`). The engine
(:class:`~lightning_fls.engine.PruningEngine`) does the rest the same way for every method:
saliencies ``ρ = w²/(2[Q]_qq)``, masks, OBS corrections, the realised-loss check. A method with a
pruning step of its own (SparseGPT's column sweep) overrides :meth:`PruningMethod.prune`.

A method's own options are the fields of its dataclass; the options every method shares
(sparsity, scope, steps, damping, …) are :class:`~lightning_fls.options.PruningOptions`.
Register a new method with :func:`register_method`; ``method=`` then accepts its name in
:func:`~lightning_fls.prune_one_shot`, the callback and LightningCLI YAML, and an instance
anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from lightning_fls.calibration import Calibration, GradientStream, StepData
from lightning_fls.calibration_budget import DEFAULT_LARGE_MODEL_BUDGET, CalibrationBudget
from lightning_fls.masks import Scope
from lightning_fls.obs import InverseCurvature

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine

Estimates = tuple[dict[str, InverseCurvature], float]
"""Each layer's estimate by weight name, and the estimates' state in MB."""


class PruningMethod(ABC):
    """One pruning method: its calibration, its defaults, its curvature estimate.

    Subclasses are dataclasses whose fields are the method's own options, and set the class
    attributes below. The engine deep-copies the instance it is given, so state a method keeps
    between the steps of one run (FishLeg's blocks) never leaks into another run.

    Attributes:
        name: The registered name (``method="…"``).
        calibration: What the method reads (:data:`~lightning_fls.calibration.Calibration`):
            ``"none"``, ``"inputs"`` (forward-only ``Σ x xᵀ``) or ``"gradients"``.
        scopes: The scopes it accepts; the first is its default.
        default_steps: Recomputation steps of :func:`~lightning_fls.prune_one_shot` by default.
        default_joint: Default of the shared ``joint`` option (joint OBS inside Q's explicit
            blocks); None where the method has no such blocks and ``joint`` does not apply.
        corrects: Whether the survivors get the OBS correction (False: weights are only zeroed).
        removes_units: Whether the engine's shared step may remove whole units with it
            (``granularity``); False for a method with a layer-wise step of its own.
        uses_damping: Whether the shared relative ``damping`` γ enters the estimate.
        scope_reason: Why the method accepts only :attr:`scopes` (for the error message).
    """

    name: ClassVar[str] = ""
    calibration: ClassVar[Calibration] = "gradients"
    scopes: ClassVar[tuple[Scope, ...]] = ("global", "layer")
    default_steps: ClassVar[int] = 16
    default_joint: ClassVar[bool | None] = None
    corrects: ClassVar[bool] = True
    removes_units: ClassVar[bool] = True
    uses_damping: ClassVar[bool] = True
    scope_reason: ClassVar[str] = ""

    @property
    def default_scope(self) -> Scope:
        """The scope used when none is given (the first of :attr:`scopes`)."""
        return self.scopes[0]

    def start(self, engine: PruningEngine) -> None:  # noqa: B027 (optional hook)
        """Called once by a new engine, before the first estimate (build run state here)."""

    def stream(
        self, engine: PruningEngine, keys: Sequence[str] | None = None
    ) -> GradientStream | None:
        """Running statistics for the next step, folded batch by batch (None: keep batches).

        A method that returns a stream gets :attr:`StepData.statistics
        <lightning_fls.calibration.StepData.statistics>` (this object after every batch)
        instead of the per-example records: memory then holds one batch of records at a time.

        Args:
            engine: The engine.
            keys: The layers to gather statistics for (None: every layer); :meth:`estimate`
                then returns the estimates of these layers only. Only asked of a method whose
                :meth:`layer_group_bytes` is not None.
        """
        return None

    def layer_group_bytes(self, engine: PruningEngine) -> dict[str, int] | None:
        """Memory each layer's statistics and estimate hold, or None: not in layer groups.

        A method that can estimate a subset of the layers from a stream of their statistics
        alone (``stream(engine, keys)``, then :meth:`estimate`) returns the bytes each layer
        needs, by weight name: :func:`~lightning_fls.prune_one_shot` then processes the layers
        in groups that fit its ``memory_budget_mb`` (:mod:`lightning_fls.layer_groups`).
        None (the default): every layer's estimate is built at once.
        """
        return None

    @abstractmethod
    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """Each layer's inverse-curvature estimate from one step's calibration data.

        Args:
            engine: The engine (layers, masks via ``canonical_mask``, device, counters).
            step: The step's data, of the kind :attr:`calibration` names.
            gamma: The absolute damping γ (0 where :attr:`uses_damping` is False).

        Returns:
            ``(estimates by weight name, their state in MB)``.
        """

    def prune(
        self, engine: PruningEngine, curvature: Mapping[str, InverseCurvature], target: float
    ) -> float | None:
        """A pruning step of the method's own, or None for the engine's shared OBS step.

        Args:
            engine: The engine; a method that prunes itself updates ``engine.masks`` and the
                weights.
            curvature: This step's estimates.
            target: The sparsity to reach.

        Returns:
            The predicted loss increase, or None to let the engine prune.
        """
        return None

    def aux_loss(self, engine: PruningEngine, step: StepData, gamma: float) -> float | None:
        """The FishLeg auxiliary loss of the method's blocks, for logging (None: no blocks)."""
        return None

    def large_model_budget(self) -> CalibrationBudget:
        """Default steps and examples per step on a large model, one-shot.

        Read by :func:`~lightning_fls.options.scale_defaults` for methods that read gradients.
        The default is :data:`~lightning_fls.calibration_budget.DEFAULT_LARGE_MODEL_BUDGET`.
        """
        return DEFAULT_LARGE_MODEL_BUDGET

    def option_values(self) -> dict[str, Any]:
        """The method's own options by name (its dataclass fields)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def fresh(self) -> PruningMethod:
        """A copy of this method's configuration with no run state."""
        return copy.deepcopy(self)


_REGISTRY: dict[str, type[PruningMethod]] = {}


def register_method(name: str, cls: type[PruningMethod], *, overwrite: bool = False) -> None:
    """Make ``cls`` available as ``method=name``.

    Args:
        name: The method's name.
        cls: A :class:`PruningMethod` subclass whose fields all have defaults.
        overwrite: Replace a method registered under ``name`` (else that is an error).

    Raises:
        TypeError: If ``cls`` is not a PruningMethod subclass.
        ValueError: If ``name`` is empty or taken (without ``overwrite``).
    """
    if not isinstance(cls, type) or not issubclass(cls, PruningMethod):
        raise TypeError(f"`cls` must be a PruningMethod subclass, got {cls!r}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls and not overwrite:
        raise ValueError(
            f"A method is already registered as {name!r} ({_REGISTRY[name].__name__}); pass "
            "overwrite=True to replace it."
        )
    _REGISTRY[name] = cls


def unregister_method(name: str) -> None:
    """Remove the method registered as ``name`` (no error if there is none)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type[PruningMethod]:
    """The class registered as ``name``.

    Raises:
        ValueError: If no method has that name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"`method` must be one of {method_names()}, got {name!r}.")
    return _REGISTRY[name]


def resolve_method(method: str | PruningMethod, **options: Any) -> PruningMethod:
    """A method instance from a registered name or an instance, with its own options set.

    Args:
        method: A registered name or a :class:`PruningMethod`.
        **options: The method's own options given as keywords of ``prune_one_shot`` or the
            callback; None values are "not given" and left at the method's defaults.

    Returns:
        A new instance (never the caller's own: it may carry state during a run).

    Raises:
        ValueError: For an unknown name, or an option the method does not have (the message
            names the method and the options it does have).
        TypeError: If ``method`` is neither a string nor a PruningMethod, or options are given
            alongside an instance.
    """
    given = {key: value for key, value in options.items() if value is not None}
    if isinstance(method, PruningMethod):
        if given:
            raise TypeError(
                f"{sorted(given)} given together with a {type(method).__name__} instance: set "
                "the method's options on the instance."
            )
        return method.fresh()
    if not isinstance(method, str):
        raise TypeError(
            f"`method` must be a registered name {method_names()} or a PruningMethod, got "
            f"{type(method).__name__}."
        )
    cls = method_class(method)
    own: set[str] = set()
    if dataclasses.is_dataclass(cls):
        own = {f.name for f in dataclasses.fields(cls) if f.init}
    foreign = sorted(set(given) - own)
    if foreign:
        names = ", ".join(f"`{key}`" for key in foreign)
        accepted = ", ".join(sorted(own)) or "none"
        raise ValueError(
            f"{names} do{'es' if len(foreign) == 1 else ''} not apply to method={method!r} "
            f"(its own options: {accepted})."
        )
    return cls(**given)
