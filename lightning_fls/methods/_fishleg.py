"""What ``fls`` and ``kfac`` share: FishLeg curvature blocks built from a step's statistics."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from lightning_fls._linalg import native_bfloat16_products
from lightning_fls._validation import check_fraction
from lightning_fls.calibration import GradientStream, StepData
from lightning_fls.calibration_budget import CalibrationBudget
from lightning_fls.fishleg import (
    AuxiliaryOptimizer,
    CurvatureBlock,
    StructurePolicy,
    aux_loss,
    build_blocks,
)
from lightning_fls.fishleg.base import QOperator
from lightning_fls.fishleg.block_diagonal import BlockDiagonalBlock
from lightning_fls.fishleg.kronecker import KroneckerBlock
from lightning_fls.fishleg.registry import Structure, block_class, new_layer_statistics
from lightning_fls.fishleg.statistics import (
    MASKED_STATISTICS,
    LayerStatistics,
    StatisticsAccumulator,
)
from lightning_fls.layers import ExampleGradients
from lightning_fls.methods.base import Estimates, PruningMethod
from lightning_fls.obs import BlockCurvature, q_sub_blocks

if TYPE_CHECKING:
    from lightning_fls.engine import PruningEngine


@dataclass
class FishLegMethod(PruningMethod):
    """Base of the methods whose Q is a FishLeg curvature block per layer.

    Args:
        structure: Per-layer block structure (a :class:`~lightning_fls.fishleg.StructurePolicy`;
            None: the method's default, :attr:`default_structure`).
        token_fraction: Fraction of each example's positions (tokens, conv output pixels)
            whose outer products enter the Kronecker statistics ``Σ a aᵀ`` and ``Σ g gᵀ``, in
            ``(0, 1]``; keyword only. Each batch keeps ``⌈token_fraction·T⌉`` positions per
            example, drawn afresh, and scales the sums to stay unbiased
            (:meth:`~lightning_fls.layers.gradients.OuterProductGradients.kronecker_factors`).
            Layers with one position per example (an MLP's) keep every example whatever
            the value. Default 0.5: on the pretrained MiniLM it left the one-shot embedding
            fidelity at 50%, 70% and 2:4 within 0.001 of every position's (0.25 too; 0.125
            lost 0.001–0.004), and it halves the cost of ``Σ g gᵀ`` of wide outputs, which
            otherwise exceeds a forward and backward pass (``docs/transformers.md``).

    Attributes:
        blocks: The blocks of the current run by weight name (built at the first estimate).
        aux: The auxiliary optimiser of the current run, if the auxiliary fit ran.
        frozen: The estimates handed out by the last :meth:`estimate` (the blocks behind the
            OBS interface), which :meth:`aux_loss` reuses.
    """

    structure: StructurePolicy | None = None
    token_fraction: float = field(default=0.5, kw_only=True)
    blocks: dict[str, CurvatureBlock] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    aux: AuxiliaryOptimizer | None = field(default=None, init=False, repr=False, compare=False)
    frozen: dict[str, FrozenBlock] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    default_structure: ClassVar[Structure] = "kronecker"
    """The block kind of every layer when no ``structure`` is given."""

    def __post_init__(self) -> None:
        if self.structure is not None and not isinstance(self.structure, StructurePolicy):
            raise TypeError(
                f"`structure` must be a StructurePolicy, got {type(self.structure).__name__}."
            )
        self.token_fraction = check_fraction("token_fraction", self.token_fraction)

    @property
    def policy(self) -> StructurePolicy:
        """The structure policy in use."""
        return self.structure or StructurePolicy(default=self.default_structure)

    def start(self, engine: PruningEngine) -> None:
        """Forget the blocks of any earlier run."""
        self.blocks = None
        self.aux = None
        self.frozen = None

    def reestimates(self) -> bool:
        """Whether every step restarts Q from its own statistics."""
        return True

    def refine(self, engine: PruningEngine, step: StepData, gamma: float) -> None:
        """Improve the blocks after their statistics-based start (nothing by default)."""

    def refines(self) -> bool:
        """Whether :meth:`refine` reads the step's per-example records (then none stream)."""
        return False

    def stream(
        self, engine: PruningEngine, keys: Sequence[str] | None = None
    ) -> GradientStream | None:
        """Each layer's block statistics (masked to the survivors), folded batch by batch.

        None where the step's Q does not start from its statistics (``reestimate=False``
        after the first step) or where :meth:`refine` needs the records.

        Args:
            engine: The engine.
            keys: The layers to gather (None: every layer).
        """
        if self.refines() or (self.blocks is not None and not self.reestimates()):
            return None
        if self.blocks is not None:  # restarted from the new statistics: free the old Q first
            self.blocks = None
            self.aux = None
            self.frozen = None
        return self._new_stream(engine, keys)

    def layer_group_bytes(self, engine: PruningEngine) -> dict[str, int] | None:
        """Each layer's statistics in bytes (its Q takes their place), where every step streams.

        None with auxiliary refinement or ``reestimate=False``: those hold every layer's Q.
        """
        if self.refines() or not self.reestimates():
            return None
        return {
            key: new_layer_statistics(key, a, self.policy).expected_bytes(a.canonical_shape)
            for key, a in engine.layers.items()
        }

    def _new_stream(
        self, engine: PruningEngine, keys: Sequence[str] | None = None
    ) -> LayerStatisticsStream:
        """Fresh accumulators for ``keys``, the Kronecker products in bfloat16 where native.

        ``Σ a aᵀ`` and ``Σ g gᵀ`` over the kept tokens (``token_fraction``, each accumulator
        drawing from its own generator, seeded by the run's seed and the layer's name) are most
        of a Kronecker estimate's cost. In
        bfloat16 (for float32 layers where
        :func:`~lightning_fls._linalg.native_bfloat16_products`, batches of at least
        :data:`~lightning_fls.layers.gradients.REDUCED_PRECISION_MIN_ROWS` rows; the sums stay
        float32) they ran 1.7–3× faster on this machine's AVX-512 BF16 cores (256–1536 tokens,
        sides 385–1537), and ``prune_one_shot`` on the pretrained MiniLM took 84 s instead of
        93 s at 50% and 71 s instead of 91 s at 70% (back-to-back runs of one commit, only the
        products switched), the embedding fidelity moved by 1e-5 and 3e-5
        (``benchmarks.pretrained``).
        """
        keys = list(engine.layers) if keys is None else list(keys)
        native = native_bfloat16_products(engine.device)

        def product_dtype(key: str) -> torch.dtype | None:  # float32 layers only
            adapter = engine.layers[key]
            weight = getattr(adapter.module, adapter.key_parameter)
            return torch.bfloat16 if native and weight.dtype == torch.float32 else None

        accumulators = {
            key: new_layer_statistics(
                key,
                engine.layers[key],
                self.policy,
                product_dtype=product_dtype(key),
                token_fraction=self.token_fraction,
                seed=_layer_seed(engine.options.seed, key),
            )
            for key in keys
        }
        masks = {  # only where a statistic reads one: Kronecker factors do not
            key: engine.canonical_mask(key).float()
            for key, accumulator in accumulators.items()
            if accumulator.needs & MASKED_STATISTICS
        }
        return LayerStatisticsStream(accumulators, masks)

    def estimate(self, engine: PruningEngine, step: StepData, gamma: float) -> Estimates:
        """The blocks, started from the step's statistics, then :meth:`refine`-d.

        The statistics are the step's :class:`LayerStatisticsStream` (the estimates are then
        those of its layers), or the recorded batches folded into one. The blocks are built
        and started one layer at a time, each layer's statistics freed as its block is
        started: the step then holds about one set of ``n·B`` floats, not two.
        """
        if self.blocks is None or self.reestimates():
            stream = step.statistics
            if not isinstance(stream, LayerStatisticsStream):
                stream = self._new_stream(engine)
                for grads in step.batches:
                    stream.update(grads)
            self.blocks = {}
            for key in list(stream.accumulators):
                adapter = engine.layers[key]
                block = build_blocks(
                    {key: adapter}, policy=self.policy, init_scale=1 / gamma, uninitialised=True
                )[key]
                block.init_from_statistics(stream.pop(key), gamma)
                self.blocks[key] = block
            self.aux = None  # λ jumped: the optimiser's moments no longer apply
        self.refine(engine, step, gamma)
        state = sum(b.aux_state_bytes() for b in self.blocks.values())
        self.frozen = {k: frozen_block(b) for k, b in self.blocks.items()}
        return dict(self.frozen), state / 2**20

    def aux_loss(self, engine: PruningEngine, step: StepData, gamma: float) -> float | None:
        """``Σ_layers Â(λ; u)`` on the step's last batch with 4 Gaussian probes per layer.

        The probes go through the step's estimates (Gram matrices formed once for this and the
        OBS step), with the products in bfloat16 where the device multiplies bfloat16 natively
        (:func:`~lightning_fls._linalg.native_bfloat16_products`): that moves the logged value
        by about 0.1% (0.03-0.14% at the autoencoder's pruning points), where the 4 probes'
        own spread is 10-20% after the first point, and makes it 1.4-2× cheaper.
        """
        if self.blocks is None or not step.batches or gamma <= 0:
            return None
        grads = step.batches[-1]
        product_dtype = torch.bfloat16 if native_bfloat16_products(engine.device) else None
        total = 0.0
        for key, block in self.blocks.items():
            shape = engine.layers[key].canonical_shape
            u = torch.randn((4, *shape), generator=engine.generator).to(engine.device)
            mask = engine.canonical_mask(key).float()
            frozen = self.frozen.get(key) if self.frozen is not None else None
            operator = None if frozen is None else frozen.operator(product_dtype)
            total += float(aux_loss(block, grads[key].fvp, u, gamma, mask=mask, operator=operator))
        return total

    def large_model_budget(self) -> CalibrationBudget:
        """The large-model budget of the policy's default structure (most layers' blocks)."""
        return block_class(self.policy.default).large_model_budget

    def option_values(self) -> dict[str, Any]:
        """The method's options, the structure resolved to the policy in use."""
        return {**super().option_values(), "structure": self.policy}


class LayerStatisticsStream:
    """Each layer's block statistics, folded one batch of per-example gradients at a time.

    Args:
        accumulators: An accumulator per weight name (what the layer's block needs).
        masks: The canonical 0/1 masks of the surviving weights, by weight name, for the
            accumulators whose statistics read one (a layer without one folds unmasked).
    """

    def __init__(
        self, accumulators: dict[str, StatisticsAccumulator], masks: dict[str, Tensor]
    ) -> None:
        self.accumulators = accumulators
        self.masks = masks

    def update(self, gradients: Mapping[str, ExampleGradients]) -> None:
        """Fold one batch into every layer's statistics (then the batch can go)."""
        for key, accumulator in self.accumulators.items():
            accumulator.update(gradients[key], mask=self.masks.get(key))

    def pop(self, key: str) -> LayerStatistics:
        """One layer's statistics, handed over and forgotten here.

        Raises:
            KeyError: If the layer's statistics were popped already.
        """
        result = self.accumulators.pop(key).result(release=True)
        self.masks.pop(key, None)
        return result


class FrozenBlock:
    """A curvature block's Q·V and diag(Q) without autograd."""

    def __init__(self, block: CurvatureBlock) -> None:
        self.block = block

    def qv(self, V: Tensor) -> Tensor:
        """``Q·V`` (no graph)."""
        with torch.no_grad():
            return self.block.qv(V)

    def diag_q(self) -> Tensor:
        """``diag(Q)`` (no graph)."""
        with torch.no_grad():
            return self.block.diag_q()

    def sub_blocks(self, index: Tensor) -> Tensor:
        """``Q[index[g], index[g]]`` (no graph)."""
        with torch.no_grad():
            return q_sub_blocks(self.block, index)

    def operator(self, product_dtype: torch.dtype | None = None) -> QOperator:
        """``V ↦ Q·V`` (no graph); ``product_dtype`` is a hint that only some blocks take."""
        with torch.no_grad():
            apply = self.block.operator()

        def frozen(V: Tensor) -> Tensor:
            with torch.no_grad():
                return apply(V)

        return frozen


class FrozenBlockMatrices(FrozenBlock):
    """A :class:`FrozenBlock` of a block whose Q has explicit diagonal blocks."""

    def block_factors(self) -> tuple[Tensor, float, int] | None:
        """``(L, c, B)`` with ``Q_j = c·L_j L_jᵀ`` where the block holds such factors (no graph)."""
        block = self.block
        if not isinstance(block, BlockDiagonalBlock):
            return None
        return block.factors.detach(), float(block.base_scale), block.block_size

    def block_matrices(self) -> tuple[Tensor, int]:
        """The diagonal blocks ``[m, B, B]`` and ``B`` (no graph)."""
        with torch.no_grad():
            blocks: tuple[Tensor, int] = getattr(self.block, "block_matrices")()  # noqa: B009
            return blocks


class FrozenKroneckerBlock(FrozenBlock):
    """A :class:`FrozenBlock` of a Kronecker block, exposing its factors' Gram matrices.

    The Gram matrices are formed once and reused (the logged aux loss, the unit saliencies and
    the OBS correction of one step read them) until a factor changes or the engine releases
    them after the layer's correction (:meth:`release_cache`).
    """

    def __init__(self, block: CurvatureBlock) -> None:
        super().__init__(block)
        self._grams: tuple[tuple[int, ...], Tensor, Tensor] | None = None

    def kronecker_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(G_o, G_i, c)`` with ``Q = c · G_o ⊗ G_i``; None with an elementwise scale."""
        block = self.block
        if not isinstance(block, KroneckerBlock) or block.scale is not None:
            return None
        out_factor, in_factor = block.out_factor, block.in_factor
        version = (id(out_factor), out_factor._version, id(in_factor), in_factor._version)
        if self._grams is None or self._grams[0] != version:
            with torch.no_grad():
                grams = (out_factor @ out_factor.T, in_factor @ in_factor.T)
            self._grams = (version, *grams)
        return self._grams[1], self._grams[2], float(block.base_scale)

    def release_cache(self) -> None:
        """Free the Gram matrices (formed again by the next call that needs them)."""
        self._grams = None

    def operator(self, product_dtype: torch.dtype | None = None) -> QOperator:
        """``V ↦ c·G_o V G_i`` from the cached Gram matrices (no graph).

        Args:
            product_dtype: Dtype of the two matrix products (None: the factors'); the result
                comes back in ``V``'s dtype.
        """
        factors = self.kronecker_factors()
        if factors is None:
            return super().operator()
        out_gram, in_gram, c = factors
        if product_dtype is not None:
            out_gram, in_gram = out_gram.to(product_dtype), in_gram.to(product_dtype)

        def apply(V: Tensor) -> Tensor:
            with torch.no_grad():
                product = out_gram @ (V.to(in_gram.dtype) @ in_gram)
                return c * product.to(V.dtype)

        return apply


def frozen_block(block: CurvatureBlock) -> FrozenBlock:
    """The block behind the OBS interface, exposing its diagonal blocks or Kronecker factors."""
    if isinstance(block, BlockCurvature):
        return FrozenBlockMatrices(block)
    if isinstance(block, KroneckerBlock):
        return FrozenKroneckerBlock(block)
    return FrozenBlock(block)


def _layer_seed(seed: int, key: str) -> int:
    """A seed of ``key``'s draws in a run seeded ``seed``, the same in every process."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63
