r"""The FishLeg auxiliary objective and the optimiser that fits Q(λ) to (F + γI)⁻¹.

For a probe ``u`` and ``v = Q(λ) u``, the auxiliary loss is

.. math::

    A(\lambda; u) = \tfrac12\, v^\top F_\gamma v - u^\top v, \qquad F_\gamma = F + \gamma I .

For any ``u`` it is minimised where ``Q u = F_γ⁻¹ u``, and with ``u ~ N(0, I)`` its expectation
``½ tr(Q F_γ Q) − tr(Q)`` has the unique minimiser ``Q = F_γ⁻¹`` on the whole space. With a
pruning mask ``m`` the probe, ``v`` and the residual are restricted to the surviving weights,
so Q learns the inverse of the *restricted* Fisher there.

Gradient (Garcia et al. 2023): ``∇_λ A = Jᵀ r`` with ``J = ∂(Q u)/∂λ`` and ``r = F_γ v − u``,
obtained by back-propagating the surrogate ``⟨Q(λ) u, stop_grad(r)⟩``.

Preconditioning (the FLS paper's, on by default) replaces ``r`` by ``Q r``, an approximate
Newton step in ``v``-space, at the cost of one more product. Its benefit depends on the regime,
because our blocks are Gram products (``Q = c L Lᵀ``) whose plain gradient step already moves Q
by ``δQ ≈ −η (R Q + Q R)`` with ``R = F_γ Q − I``:

* from the paper's ``Q₀ = I/γ``, far from the optimum, the plain gradient is 2–3× faster
  (``precondition=False``; the test suite guards this comparison);
* from a statistics-based initialisation with noisy per-batch Fisher products (the recommended
  path), multiplying the residual by Q damps the noise of the high-curvature directions: on a
  trained MLP it reached the lowest held-out aux loss of all settings and stayed stable at
  learning rates where the plain fit diverged (``benchmarks/aux_convergence.py``).

Normalisation. The reported loss is ``Â = γ · Σ_p A(λ; u_p) / Σ_p ‖u_p‖²`` over the probes of
a step (for Gaussian probes ``Σ_p ‖u_p‖² ≈ P·n``, ``n`` the surviving coordinates): it is
scale-free, ``-½`` where F is negligible next to γ and ``-½ · mean(γ / (μ_i + γ))`` at the
optimum (``μ_i`` the eigenvalues of F). The surrogate whose gradient updates λ is instead
divided by ``Σ_p ‖v_p‖²`` (detached; as the official FishLeg code does), so the size of λ's
gradient does not follow Q's magnitude. Q typically moves over orders of magnitude (from ``1/γ``
down to ``1/μ``), and with a fixed normalisation Adam's second-moment estimate, remembering the
early large gradients, then stalls the fit (measured:
``benchmarks/aux_convergence.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fls._validation import check_choice, check_positive, check_positive_int
from lightning_fls.fishleg.base import CurvatureBlock, QOperator
from lightning_fls.layers.gradients import ExampleGradients

ProbeKind = Literal["gaussian", "outer"]
"""How probes ``u`` are drawn, see :class:`AuxiliaryOptimizer`."""

FisherVectorProduct = Callable[[Tensor], Tensor]
"""``V ↦ F·V`` (undamped) on canonical tensors ``[..., d_out, d_in']``."""

DEFAULT_RELATIVE_DAMPING = 1e-2
"""Default γ relative to the mean of diag F (see :func:`relative_damping`)."""


def relative_damping(
    gradients: Mapping[str, ExampleGradients] | Sequence[Mapping[str, ExampleGradients]],
    relative: float = DEFAULT_RELATIVE_DAMPING,
    *,
    scope: Literal["global", "layer"] = "global",
) -> dict[str, float]:
    """Damping γ set relative to the Fisher's scale: ``γ = relative · mean(diag F)``.

    γ slides OBS between magnitude pruning (γ ≫ F: Q ≈ I/γ) and full OBS (γ → 0), so it must
    follow the Fisher's scale, which varies by orders of magnitude between models and losses.
    The default 1e-2 follows the planning measurements in the method notes (section 9: 1e-3
    was too small, 1e-2 and 1e-1 both good).

    ``diag F`` is averaged over **every** example given, so γ describes the same Fisher as the
    statistics it damps. Set from a part of the data instead, it can be orders of magnitude
    off: when a model fits its data, most examples have gradients near zero and a few carry
    the Fisher, so the trace of one small batch says little about the trace of the whole.

    Args:
        gradients: Per-example gradients of each layer, for one batch or a sequence of
            batches (each weighted by its number of examples).
        relative: The factor (> 0).
        scope: ``"global"``: one γ from the mean of diag F over all layers' entries (saliencies
            stay comparable across layers); ``"layer"``: one γ per layer from its own mean.

    Returns:
        γ for every layer key.

    Raises:
        ValueError: If ``gradients`` is empty, or an argument is out of range.
    """
    relative = check_positive("relative", relative)
    check_choice("scope", scope, ("global", "layer"))
    batches = [gradients] if isinstance(gradients, Mapping) else list(gradients)
    if not batches or not batches[0]:
        raise ValueError("`gradients` is empty: there is no layer to set a damping for.")
    keys = list(batches[0])
    examples = sum(next(iter(batch.values())).batch_size for batch in batches)
    traces = {
        key: sum(float(batch[key].trace()) * batch[key].batch_size for batch in batches) / examples
        for key in keys
    }
    sizes = {key: math.prod(batches[0][key].shape) for key in keys}
    return damping_from_traces(traces, sizes, relative, scope=scope)


def damping_from_traces(
    traces: Mapping[str, float],
    sizes: Mapping[str, int],
    relative: float = DEFAULT_RELATIVE_DAMPING,
    *,
    scope: Literal["global", "layer"] = "global",
) -> dict[str, float]:
    """:func:`relative_damping` from each layer's Fisher trace (streamed statistics).

    Args:
        traces: ``tr F`` per layer (the mean over examples of ``‖G_b‖²``).
        sizes: Entries per layer (``d_out · d_in'``).
        relative: The factor (> 0).
        scope: As in :func:`relative_damping`.

    Returns:
        γ for every layer key.
    """
    relative = check_positive("relative", relative)
    tiny = torch.finfo(torch.float32).tiny
    if scope == "layer":
        return {key: relative * max(traces[key] / sizes[key], tiny) for key in traces}
    mean = sum(traces.values()) / sum(sizes[key] for key in traces)
    return dict.fromkeys(traces, relative * max(mean, tiny))


@dataclass
class AuxTerms:
    """The quantities of one auxiliary evaluation.

    Attributes:
        v: ``Q u`` (masked), with its graph to λ when built with gradients enabled.
        residual: ``F_γ v − u`` (masked), detached.
        loss: The normalised auxiliary loss ``Â``, a detached 0-dim tensor.
        normaliser: ``γ / Σ_p ‖u_p‖²``, the factor that turns ``Σ_p A(λ; u_p)`` into ``Â``.
        grad_scale: ``1 / Σ_p ‖v_p‖²``, the factor applied to the surrogate for λ's gradient.
    """

    v: Tensor
    residual: Tensor
    loss: Tensor
    normaliser: float
    grad_scale: float


def aux_terms(
    v: Tensor,
    fvp: FisherVectorProduct,
    probes: Tensor,
    damping: float,
    mask: Tensor | None = None,
) -> AuxTerms:
    """Evaluate the residual ``r = F_γ v − u`` and the normalised loss for ``v = Q u``.

    Args:
        v: ``Q u`` for each probe, ``[P, d_out, d_in']`` (with its graph to λ if wanted).
        fvp: Undamped Fisher–vector product of the layer.
        probes: ``u``, shape ``[P, d_out, d_in']`` (already masked).
        damping: γ > 0.
        mask: Optional boolean or 0/1 mask ``[d_out, d_in']`` of surviving weights.

    Returns:
        The terms; ``loss = γ · Σ_p (½ v_pᵀ F_γ v_p − u_pᵀ v_p) / Σ_p ‖u_p‖²``.
    """
    if mask is not None:
        v = v * mask
    with torch.no_grad():
        v_const = v.detach()
        Fv = fvp(v_const) + damping * v_const
        if mask is not None:
            Fv = Fv * mask
        residual = Fv - probes
        tiny = torch.finfo(v_const.dtype).tiny
        normaliser = damping / max(float(probes.square().sum()), tiny)
        loss = normaliser * (v_const * (0.5 * Fv - probes)).sum()
        grad_scale = 1.0 / max(float(v_const.square().sum()), tiny)
    return AuxTerms(v=v, residual=residual, loss=loss, normaliser=normaliser, grad_scale=grad_scale)


def aux_loss(
    block: CurvatureBlock,
    fvp: FisherVectorProduct,
    probes: Tensor,
    damping: float,
    mask: Tensor | None = None,
    *,
    operator: QOperator | None = None,
) -> Tensor:
    """The normalised auxiliary loss ``Â(λ; u)`` of a block, without gradients.

    Args:
        block: The curvature block.
        fvp: Undamped Fisher–vector product of the layer.
        probes: ``u``, shape ``[P, d_out, d_in']``.
        damping: γ > 0.
        mask: Optional mask of surviving weights ``[d_out, d_in']``.
        operator: ``V ↦ Q·V`` to use instead of ``block.operator()`` (the same Q, formed
            elsewhere: from cached Gram matrices, or with products in another precision).

    Returns:
        A 0-dim tensor.
    """
    with torch.no_grad():
        u = probes if mask is None else probes * mask
        apply = block.operator() if operator is None else operator
        return aux_terms(apply(u), fvp, u, damping, mask).loss


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry is finite, in one read per tensor (NaN and ±inf survive a sum)."""
    sums = [t.sum() for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def _adam(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch supports it (7x faster on CPU for block-50)."""
    try:
        return torch.optim.Adam(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, **kwargs)


def aux_gradients(
    block: CurvatureBlock,
    fvp: FisherVectorProduct,
    probes: Tensor,
    damping: float,
    *,
    mask: Tensor | None = None,
    precondition: bool = True,
    params: list[torch.nn.Parameter] | None = None,
    probe_factors: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The auxiliary loss and the (optionally preconditioned) gradient direction for λ.

    Back-propagates the surrogate ``s · ⟨Q(λ) u, stop_grad(d)⟩`` into the block's parameters,
    with ``d = r`` (then the result is ``(s/ν)·∇_λ Â``, ``ν = γ / Σ_p ‖u_p‖²``) or ``d = Q r``
    (preconditioned), and ``s = 1 / Σ_p ‖v_p‖²`` (see :class:`AuxTerms`).

    Args:
        block: The curvature block.
        fvp: Undamped Fisher–vector product of the layer.
        probes: ``u``, shape ``[P, d_out, d_in']``, already masked.
        damping: γ > 0.
        mask: Optional mask of surviving weights ``[d_out, d_in']``.
        precondition: Use ``Q r`` instead of ``r``.
        params: The parameters to differentiate (default: all of the block's).
        probe_factors: ``(x, y)`` with ``u_p = x_p y_pᵀ``, for outer-product probes. Blocks
            with :meth:`CurvatureBlock.outer_factors` then never form a full product, with or
            without preconditioning (ignored when ``mask`` is given: a masked outer product is
            no longer one).

    Returns:
        ``(loss, grads)``; ``grads`` is None when the loss, the residual or a gradient is not
        finite (the caller should then skip the update).
    """
    params = list(block.parameters()) if params is None else params
    operator: QOperator | None = None
    factors = None
    with torch.enable_grad():
        if probe_factors is not None and mask is None:
            factors = block.outer_factors(*probe_factors)
        if factors is not None:
            v = factors[0].unsqueeze(-1) * factors[1].unsqueeze(-2)
        else:
            operator = block.operator()
            v = operator(probes)
        terms = aux_terms(v, fvp, probes, damping, mask)
        if not _all_finite([terms.loss, terms.residual]):
            return terms.loss, None
        if precondition and factors is not None:
            # ⟨Q u, stop(Q r)⟩ = ⟨stop(Q)(Q u), r⟩ by symmetry, and stop(Q) keeps Q u = x'y'ᵀ an
            # outer product: O(d²) instead of forming Q r.
            pre = block.outer_factors(*factors, detach=True)
            assert pre is not None
            inner = torch.einsum("pi,pij,pj->", pre[0], terms.residual, pre[1])
            surrogate = terms.grad_scale * inner
        else:
            direction = terms.residual
            if precondition:
                with torch.no_grad():
                    direction = (operator or block.operator())(direction)
                    if mask is not None:
                        direction = direction * mask
            surrogate = terms.grad_scale * (terms.v * direction).sum()
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    filled = tuple(
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    )
    if not _all_finite(filled):
        return terms.loss, None
    return terms.loss, filled


@dataclass
class AuxStepResult:
    """What one :meth:`AuxiliaryOptimizer.step` did.

    Attributes:
        losses: Normalised aux loss ``Â`` per layer, before the update.
        skipped: Layers whose update was skipped because a loss or gradient was not finite.
    """

    losses: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        """Mean of the finite per-layer losses (NaN if there is none)."""
        finite = [x for x in self.losses.values() if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else math.nan


class AuxiliaryOptimizer:
    """Fits each block's λ to ``(F + γI)⁻¹`` by stochastic minimisation of the aux loss.

    One :meth:`step` draws Gaussian probes ``u ~ N(0, I)`` (masked) per layer, evaluates the
    auxiliary loss with the given Fisher–vector products, back-propagates the (optionally
    preconditioned) surrogate into λ with :func:`torch.autograd.grad` (so no model ``.grad`` is
    touched) and takes one Adam step. A layer whose loss or gradient is not finite is skipped for
    that step and counted in :attr:`num_skipped`; Q is then left exactly as it was.

    Probes come from the optimiser's own seeded generator, so replicas seeded alike draw the
    same probes (what data-parallel training needs).

    Args:
        blocks: Curvature blocks keyed by layer.
        lr: Adam learning rate (> 0). The blocks' parameters are of order one (their magnitude
            lives in a fixed scale), so this is a relative step size; dense ``d × d`` factors
            use ``lr/√d`` (see :meth:`CurvatureBlock.lr_multipliers`). The default suits a
            statistics-initialised Q; fitting from ``Q₀ = I/γ`` wants about ``1e-2``.
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ε (> 0).
        precondition: Use the preconditioned residual ``Q r`` (the FLS paper's) instead of
            ``r``. Best with a statistics-initialised Q; from ``Q₀ = I/γ`` switch it off (see
            the module docstring).
        num_probes: Probes ``u`` per layer and step (>= 1); more lowers the gradient's variance.
        probe: ``"outer"``: ``u = x yᵀ`` with ``x, y`` standard Gaussian vectors;
            ``"gaussian"``: ``u ~ N(0, I)``. Both have ``E[u uᵀ] = I``, hence the same expected
            objective and minimiser. Outer-product probes make ``Q u`` cost ``O(d²)`` instead of
            ``O(d³)`` for a Kronecker block without ``D`` on unmasked layers (an aux step of the
            FishLeg autoencoder: 1.9 instead of 18 training steps) for a little more variance
            per step (``benchmarks/curvature_cost.py``, ``benchmarks/aux_convergence.py``).
        seed: Seed of the probe generator.

    Raises:
        ValueError: If an argument is out of range or ``blocks`` is empty.
    """

    def __init__(
        self,
        blocks: Mapping[str, CurvatureBlock],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        precondition: bool = True,
        num_probes: int = 1,
        probe: ProbeKind = "outer",
        seed: int = 0,
    ) -> None:
        if not blocks:
            raise ValueError("`blocks` is empty: there is nothing to fit.")
        self.blocks = dict(blocks)
        self.lr = check_positive("lr", lr)
        self.eps = check_positive("eps", eps)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        self.precondition = bool(precondition)
        self.num_probes = check_positive_int("num_probes", num_probes)
        self.probe: ProbeKind = check_choice("probe", probe, ("gaussian", "outer"))  # type: ignore[assignment]
        self.seed = int(seed)
        groups = []
        for block in self.blocks.values():
            multipliers = block.lr_multipliers()
            for name, param in block.named_parameters():
                groups.append({"params": [param], "lr": self.lr * multipliers.get(name, 1.0)})
        self.optimizer = _adam(groups, lr=self.lr, betas=betas, eps=self.eps)
        self.generator = self._make_generator()
        self.num_steps = 0
        self.num_skipped = 0

    def _make_generator(self) -> torch.Generator:
        # A CPU generator on every device: the same seed gives the same probes on CPU and GPU,
        # and its state is device-independent in checkpoints.
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return generator

    def sample_probes(
        self, key: str, mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Draw ``num_probes`` probes for a layer.

        Args:
            key: The layer.
            mask: Optional mask of surviving weights.

        Returns:
            ``u`` of shape ``[num_probes, d_out, d_in']`` (zero where the mask is), and for
            outer-product probes the factors ``(x, y)`` with ``u_p = x_p y_pᵀ`` (else None).
        """
        block = self.blocks[key]
        d_out, d_in = block.shape
        if self.probe == "outer":
            x = torch.randn((self.num_probes, d_out), generator=self.generator, dtype=block.dtype)
            y = torch.randn((self.num_probes, d_in), generator=self.generator, dtype=block.dtype)
            x, y = x.to(block.device), y.to(block.device)
            u = x.unsqueeze(-1) * y.unsqueeze(-2)
            return (u, (x, y)) if mask is None else (u * mask, None)
        u = torch.randn((self.num_probes, d_out, d_in), generator=self.generator, dtype=block.dtype)
        u = u.to(block.device)
        return (u if mask is None else u * mask), None

    def step(
        self,
        fvps: Mapping[str, FisherVectorProduct],
        damping: float | Mapping[str, float],
        *,
        masks: Mapping[str, Tensor] | None = None,
        probes: Mapping[str, Tensor] | None = None,
    ) -> AuxStepResult:
        """One auxiliary update of the layers in ``fvps``.

        Args:
            fvps: Undamped Fisher–vector product per layer (a subset of the blocks may be given).
            damping: γ, one for all layers or one per layer.
            masks: Optional masks of surviving weights per layer (``[d_out, d_in']``).
            probes: Optional probes ``[P, d_out, d_in']`` per layer instead of random ones.

        Returns:
            The per-layer losses before the update and the layers skipped.

        Raises:
            KeyError: If ``fvps`` names a layer without a block.
        """
        result = AuxStepResult()
        self.optimizer.zero_grad(set_to_none=True)
        for key, fvp in fvps.items():
            if key not in self.blocks:
                raise KeyError(f"No curvature block for layer `{key}`.")
            block = self.blocks[key]
            gamma = damping if isinstance(damping, (int, float)) else damping[key]
            gamma = check_positive("damping", gamma)
            mask = None if masks is None else masks.get(key)
            if mask is not None:
                mask = mask.to(device=block.device, dtype=block.dtype)
            factors = None
            if probes is not None and key in probes:
                u = probes[key].to(block.dtype)
                u = u if mask is None else u * mask
            else:
                u, factors = self.sample_probes(key, mask)
            params = [p for p in block.parameters() if p.requires_grad]
            loss, param_grads = aux_gradients(
                block,
                fvp,
                u,
                gamma,
                mask=mask,
                precondition=self.precondition,
                params=params,
                probe_factors=factors,
            )
            result.losses[key] = float(loss)
            if param_grads is None:
                result.skipped.append(key)
                continue
            for param, grad in zip(params, param_grads, strict=True):
                param.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_steps += 1
        self.num_skipped += len(result.skipped)
        return result

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state, probe-generator state and counters (not the blocks' λ).

        Returns:
            A picklable dictionary.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Args:
            state: The saved state.
        """
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.num_steps = int(state["num_steps"])
        self.num_skipped = int(state["num_skipped"])

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """All auxiliary parameters being fitted.

        Yields:
            Each block's parameters.
        """
        for block in self.blocks.values():
            yield from block.parameters()
