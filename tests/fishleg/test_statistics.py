"""The statistics-based (K-FAC) initialisation equals the dense Kronecker inverse it claims."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_fls.fishleg import BlockDiagonalBlock, KroneckerBlock, StatisticsAccumulator
from lightning_fls.layers import DenseGradients, GradientCapture, OuterProductGradients, find_layers
from tests.reference import per_example_gradients

F64 = torch.float64


def ce_one(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("use_scale", [False, True])
def test_kfac_init_equals_dense_kronecker_inverse(use_scale: bool) -> None:
    model = nn.Sequential(nn.Linear(4, 3, dtype=F64), nn.Tanh(), nn.Linear(3, 2, dtype=F64))
    adapters = find_layers(model)
    key = "0.weight"
    acc = StatisticsAccumulator({"in_cov", "out_cov"})
    inputs, out_grads = [], []
    for batch in (6, 4, 5):  # unequal batches: the running mean must weight by examples
        x, y = torch.randn(batch, 4, dtype=F64), torch.randint(0, 2, (batch,))
        with GradientCapture({key: adapters[key]}) as capture:
            F.cross_entropy(model(x), y).backward()
        acc.update(capture.example_gradients(dtype=F64)[key])
        # Independent reference: the per-example gradient of a Linear layer with bias is
        # g aᵀ with a = [x, 1], so its bias column is the output gradient g itself.
        G = per_example_gradients(model, ce_one, x, y, {key: adapters[key]})[key]
        inputs.append(torch.cat([x, torch.ones(batch, 1, dtype=F64)], 1))
        out_grads.append(G[:, :, -1])
    a, g = torch.cat(inputs), torch.cat(out_grads)
    A = a.T @ a / a.shape[0]
    Gm = g.T @ g / g.shape[0]
    stats = acc.result()
    assert stats.num_examples == 15
    torch.testing.assert_close(stats.in_cov, A)
    torch.testing.assert_close(stats.out_cov, Gm)

    gamma = 0.05
    block = KroneckerBlock((3, 5), use_scale=use_scale, dtype=F64)
    block.init_from_statistics(stats, gamma)
    pi = math.sqrt((torch.trace(A) / 5) / (torch.trace(Gm) / 3))
    expected = torch.kron(
        torch.linalg.inv(Gm + math.sqrt(gamma) / pi * torch.eye(3, dtype=F64)),
        torch.linalg.inv(A + pi * math.sqrt(gamma) * torch.eye(5, dtype=F64)),
    )
    torch.testing.assert_close(block.to_dense(), expected)
    # Factors are normalised: the magnitude lives in the fixed scale, λ stays of order one.
    gram = (block.out_factor @ block.out_factor.T).detach()
    assert float(gram.diagonal().mean()) == pytest.approx(1.0)
    assert block.scale is None or torch.all(block.scale == 1)


def test_kfac_init_of_conv_layer_matches_kfc_statistics() -> None:
    a = torch.randn(3, 7, 1, 5, dtype=F64)  # [B, T, K, d_in']
    g = torch.randn(3, 7, 1, 2, dtype=F64)
    acc = StatisticsAccumulator({"in_cov", "out_cov"})
    acc.update(OuterProductGradients(a, g))
    stats = acc.result()
    flat_a = a.reshape(-1, 5)
    torch.testing.assert_close(
        stats.in_cov, flat_a.T @ flat_a / 21
    )  # mean over examples and positions
    flat_g = g.reshape(-1, 2)
    torch.testing.assert_close(
        stats.out_cov, flat_g.T @ flat_g / 3
    )  # sum over positions, mean over examples


def test_kronecker_statistics_with_bfloat16_products_stay_float32_and_close() -> None:
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(8, 40, 1, 33, generator=generator)  # [B, T, K, d_in'], float32: 320 rows
    g = torch.randn(8, 40, 1, 17, generator=generator)
    exact = StatisticsAccumulator({"in_cov", "out_cov"})
    rounded = StatisticsAccumulator({"in_cov", "out_cov"}, product_dtype=torch.bfloat16)
    for acc in (exact, rounded):
        acc.update(OuterProductGradients(a, g))
    want, got = exact.result(), rounded.result()
    flat_a, flat_g = a.double().reshape(-1, 33), g.double().reshape(-1, 17)
    for name, value, reference in (
        ("in_cov", got.in_cov, flat_a.T @ flat_a / 320),
        ("out_cov", got.out_cov, flat_g.T @ flat_g / 8),
    ):
        assert value is not None, name
        assert value.dtype == torch.float32, name
        error = float((value.double() - reference).norm() / reference.norm())
        assert 0 < error < 1e-2, (name, error)  # rounded (8 significant bits), yet close
    assert want.in_cov is not None
    assert float((want.in_cov.double() - flat_a.T @ flat_a / 320).norm()) < 1e-3
    # Fewer rows than REDUCED_PRECISION_MIN_ROWS: the products stay in float32.
    few = StatisticsAccumulator({"in_cov", "out_cov"}, product_dtype=torch.bfloat16)
    few.update(OuterProductGradients(a[:2, :100], g[:2, :100]))  # 200 rows each
    exact_few = StatisticsAccumulator({"in_cov", "out_cov"})
    exact_few.update(OuterProductGradients(a[:2, :100], g[:2, :100]))
    assert torch.equal(few.result().in_cov, exact_few.result().in_cov)
    assert torch.equal(few.result().out_cov, exact_few.result().out_cov)


@pytest.mark.parametrize(("native", "dtype", "expected"), [
    (True, torch.float32, torch.bfloat16),
    (False, torch.float32, None),
    (True, torch.float64, None),
])  # fmt: skip
def test_fishleg_streams_take_bfloat16_products_only_for_float32_layers_where_native(
    monkeypatch: pytest.MonkeyPatch, native: bool, dtype: torch.dtype, expected: object
) -> None:
    import lightning_fls.methods._fishleg as fishleg_method
    from lightning_fls.engine import PruningEngine
    from lightning_fls.layers import prunable_layers
    from lightning_fls.methods import resolve_method
    from lightning_fls.options import build_options

    monkeypatch.setattr(fishleg_method, "native_bfloat16_products", lambda device: native)
    model = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.ReLU(), nn.Linear(5, 3, dtype=dtype))
    opts = build_options(resolve_method("fls"), sparsity=0.5, progress=False)
    engine = PruningEngine(prunable_layers(model), opts, torch.device("cpu"))
    stream = engine.method.stream(engine)
    assert stream is not None
    assert {acc.product_dtype for acc in stream.accumulators.values()} == {expected}


@pytest.mark.parametrize("groups", [1, 3])
def test_kronecker_factors_over_kept_positions_match_the_dense_sums(groups: int) -> None:
    generator = torch.Generator().manual_seed(7)
    B, T, d_in, m = 5, 9, 4, 2
    a = torch.randn(B, T, groups, d_in, dtype=F64, generator=generator)
    g = torch.randn(B, T, groups, m, dtype=F64, generator=generator)
    fraction, kept = 0.3, 3  # ⌈0.3·9⌉
    A, G = OuterProductGradients(a, g).kronecker_factors(
        token_fraction=fraction, generator=torch.Generator().manual_seed(11)
    )
    # The same draw, replayed: each example's kept positions.
    positions = torch.rand(B, T, generator=torch.Generator().manual_seed(11)).argsort(1)[:, :kept]
    A_ref = torch.zeros(d_in, d_in, dtype=F64)
    G_ref = torch.zeros(groups * m, groups * m, dtype=F64)
    for b in range(B):
        assert len(set(positions[b].tolist())) == kept  # without replacement
        for t in positions[b].tolist():
            for k in range(groups):
                A_ref += torch.outer(a[b, t, k], a[b, t, k])
            g_all = g[b, t].reshape(-1)  # the gradient over every group
            G_ref += torch.outer(g_all, g_all)
    torch.testing.assert_close(A, A_ref * (T / kept) / (B * T * groups))
    torch.testing.assert_close(G, G_ref * (T / kept) / B)


def test_kept_positions_average_to_the_full_factors() -> None:
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(4, 12, 1, 3, dtype=F64, generator=generator)
    g = torch.randn(4, 12, 1, 2, dtype=F64, generator=generator)
    grads = OuterProductGradients(a, g)
    A, G = grads.kronecker_factors()
    draws = torch.Generator().manual_seed(5)
    sums = [torch.zeros_like(A), torch.zeros_like(G)]
    for _ in range(2000):
        for total, value in zip(
            sums, grads.kronecker_factors(token_fraction=0.25, generator=draws), strict=True
        ):
            total += value / 2000
    # Unbiased: the mean of 2000 draws of 3 of 12 positions is within 2% of the full sums,
    # while one draw is not.
    one_A, _ = grads.kronecker_factors(token_fraction=0.25, generator=draws)
    assert float((one_A - A).norm() / A.norm()) > 0.1
    for mean, full in zip(sums, (A, G), strict=True):
        assert float((mean - full).norm() / full.norm()) < 0.02


def test_every_position_is_kept_at_fraction_one_and_with_one_position() -> None:
    generator = torch.Generator().manual_seed(2)
    sequences = OuterProductGradients(torch.randn(3, 6, 1, 4), torch.randn(3, 6, 1, 2))
    single = OuterProductGradients(torch.randn(7, 1, 1, 4), torch.randn(7, 1, 1, 2))
    for grads, fraction in ((sequences, 1.0), (single, 0.1)):
        state = generator.get_state()
        full = grads.kronecker_factors()
        kept = grads.kronecker_factors(token_fraction=fraction, generator=generator)
        assert torch.equal(generator.get_state(), state)  # no draw was made
        for value, reference in zip(kept, full, strict=True):
            assert torch.equal(value, reference)


@pytest.mark.parametrize("product_rows", [1, 40, 10_000])
def test_rows_multiplied_together_give_the_mean_of_each_batch_factors(
    monkeypatch: pytest.MonkeyPatch, product_rows: int
) -> None:
    import lightning_fls.fishleg.statistics as statistics_module

    monkeypatch.setattr(statistics_module, "product_rows", lambda side: product_rows)
    generator = torch.Generator().manual_seed(9)
    # Unequal batches, positions and groups per batch: every divisor differs.
    shapes = [(3, 8, 2), (5, 4, 2), (2, 11, 2), (4, 1, 2)]
    batches = [
        OuterProductGradients(torch.randn(B, T, K, 5, dtype=F64, generator=generator),
                              torch.randn(B, T, K, 3, dtype=F64, generator=generator))
        for B, T, K in shapes
    ]  # fmt: skip
    acc = StatisticsAccumulator({"in_cov", "out_cov"}, token_fraction=0.4, seed=6)
    for grads in batches:
        acc.update(grads)
    got = acc.result()
    draws = torch.Generator().manual_seed(6)  # the accumulator's draws, replayed batch by batch
    total = sum(B for B, _, _ in shapes)
    A = torch.zeros(5, 5, dtype=F64)
    G = torch.zeros(6, 6, dtype=F64)
    for grads in batches:
        A_b, G_b = grads.kronecker_factors(token_fraction=0.4, generator=draws)
        A += A_b * grads.batch_size / total
        G += G_b * grads.batch_size / total
    torch.testing.assert_close(got.in_cov, A)
    torch.testing.assert_close(got.out_cov, G)
    assert got.num_examples == total


def test_rows_wait_for_a_quarter_of_the_side_at_most_512() -> None:
    from lightning_fls.fishleg.statistics import product_rows

    assert [product_rows(d) for d in (3, 64, 769, 2048, 3073)] == [1, 16, 192, 512, 512]


def test_accumulators_draw_the_same_positions_for_the_same_batches() -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [
        OuterProductGradients(torch.randn(2, 10, 1, 3, generator=generator),
                              torch.randn(2, 10, 1, 2, generator=generator))
        for _ in range(3)
    ]  # fmt: skip
    results = []
    for seed in (0, 0, 1):
        acc = StatisticsAccumulator({"in_cov", "out_cov"}, token_fraction=0.5, seed=seed)
        for grads in batches:
            acc.update(grads)
        results.append(acc.result())
    same, again, other = results
    assert torch.equal(same.in_cov, again.in_cov)
    assert torch.equal(same.out_cov, again.out_cov)
    assert not torch.equal(same.in_cov, other.in_cov)
    full = StatisticsAccumulator({"in_cov", "out_cov"})
    for grads in batches:
        full.update(grads)
    assert not torch.equal(same.in_cov, full.result().in_cov)


def test_fishleg_streams_pass_the_token_fraction_with_a_seed_per_layer() -> None:
    from lightning_fls.engine import PruningEngine
    from lightning_fls.layers import prunable_layers
    from lightning_fls.methods import KFAC, resolve_method
    from lightning_fls.options import build_options

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    for method in (resolve_method("fls", token_fraction=0.25), KFAC(token_fraction=0.25)):
        engine = PruningEngine(
            prunable_layers(model), build_options(method, sparsity=0.5), torch.device("cpu")
        )
        stream = engine.method.stream(engine)
        assert stream is not None
        accumulators = list(stream.accumulators.values())
        assert {acc.token_fraction for acc in accumulators} == {0.25}
        first, second = (acc._generator for acc in accumulators)
        assert first is not None
        assert second is not None
        assert first.initial_seed() != second.initial_seed()


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan")])
def test_token_fraction_outside_zero_to_one_is_an_error(value: float) -> None:
    from lightning_fls.methods import FLS, KFAC

    for make in (
        lambda: StatisticsAccumulator({"in_cov"}, token_fraction=value),
        lambda: FLS(token_fraction=value),
        lambda: KFAC(token_fraction=value),
    ):
        with pytest.raises(ValueError, match=r"`token_fraction` must be in \(0, 1\]"):
            make()
    with pytest.raises(TypeError, match="`token_fraction` must be a number"):
        FLS(token_fraction="half")  # type: ignore[arg-type]


def test_accumulator_errors() -> None:
    with pytest.raises(ValueError, match="unknown statistics"):
        StatisticsAccumulator({"hessian"})
    with pytest.raises(RuntimeError, match="No batch"):
        StatisticsAccumulator({"diag_fisher"}).result()


@pytest.mark.parametrize("masked", [False, True])
def test_block_fisher_init_is_the_exact_damped_block_inverse(masked: bool) -> None:
    """The closed-form start of a block-diagonal Q: (F_j + γI)⁻¹ of every diagonal block."""
    grads = torch.randn(9, 3, 5, dtype=F64)  # 9 examples, canonical 3 x 5 (n = 15)
    mask = (torch.rand(3, 5) > 0.3).to(F64) if masked else None
    block = BlockDiagonalBlock((3, 5), block_size=4, dtype=F64)  # 4 blocks, last one padded
    accumulator = block.new_statistics()
    accumulator.update(DenseGradients(grads[:4]), mask=mask)
    accumulator.update(DenseGradients(grads[4:]), mask=mask)
    block.init_from_statistics(accumulator.result(), damping=0.2)

    flat = (grads if mask is None else grads * mask).reshape(9, -1)
    fisher = flat.T @ flat / 9
    expected = torch.zeros(15, 15, dtype=F64)
    for start in range(0, 15, 4):
        stop = min(start + 4, 15)
        size = stop - start
        expected[start:stop, start:stop] = torch.linalg.inv(
            fisher[start:stop, start:stop] + 0.2 * torch.eye(size, dtype=F64)
        )
    torch.testing.assert_close(block.to_dense(), expected)


@pytest.mark.parametrize(
    ("T", "K", "m", "d_in", "block_size"),
    [(1, 1, 7, 11, 4), (1, 1, 3, 50, 50), (3, 1, 4, 9, 5), (2, 3, 2, 5, 6), (1, 1, 6, 3, 8)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_block_fisher_of_factored_gradients_matches_the_dense_blocks(
    T: int, K: int, m: int, d_in: int, block_size: int, masked: bool
) -> None:
    from lightning_fls.layers.gradients import OuterProductGradients

    B = 6
    grads = OuterProductGradients(
        torch.randn(B, T, K, d_in, dtype=F64), torch.randn(B, T, K, m, dtype=F64)
    )
    d_out = K * m
    mask = (torch.rand(d_out, d_in) > 0.4).to(F64) if masked else None
    dense = grads.materialise()
    assert dense.shape == (B, d_out, d_in)
    for row0, row1 in [(0, d_out), (1, d_out), (d_out - 1, d_out)]:
        torch.testing.assert_close(grads.materialise_rows(row0, row1), dense[:, row0:row1])
    flat = (dense if mask is None else dense * mask).reshape(B, -1)
    n = flat.shape[1]
    flat = torch.nn.functional.pad(flat, (0, -n % block_size))
    blocks = flat.reshape(B, -1, block_size)
    expected = torch.einsum("bji,bjk->jik", blocks, blocks) / B
    torch.testing.assert_close(grads.block_fisher(block_size, mask), expected)


def test_block_fisher_is_the_same_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few blocks (every boundary case) give the dense blocks, summed into `out`."""
    import lightning_fls.layers.gradients as gradients

    monkeypatch.setattr(gradients, "_BLOCK_CHUNK_ELEMENTS", 40)
    B, d_out, d_in, block_size = 5, 4, 9, 4  # n = 36: 9 blocks, 2 per chunk
    grads = OuterProductGradients(
        torch.randn(B, 1, 1, d_in, dtype=F64), torch.randn(B, 1, 1, d_out, dtype=F64)
    )
    mask = (torch.rand(d_out, d_in) > 0.4).to(F64)
    flat = (grads.materialise() * mask).reshape(B, -1)
    blocks = flat.reshape(B, -1, block_size)
    expected = torch.einsum("bji,bjk->jik", blocks, blocks)
    out = torch.ones(9, block_size, block_size, dtype=F64)
    grads.block_fisher(block_size, mask, out=out)
    torch.testing.assert_close(out, expected + 1)


@pytest.mark.parametrize("blocks_per_chunk", [4096, 3])
def test_block_init_on_live_sub_blocks_is_the_exact_damped_block_inverse(
    monkeypatch: pytest.MonkeyPatch, blocks_per_chunk: int
) -> None:
    """Sparse statistics: each block factorised on its live coordinates gives the same Q."""
    import lightning_fls.fishleg.block_diagonal as block_diagonal

    monkeypatch.setattr(block_diagonal, "_BLOCKS_PER_CHUNK", blocks_per_chunk)
    shape, size, gamma = (6, 21), 10, 0.3  # n = 126: 13 blocks, the last one padded
    grads = torch.randn(40, *shape, dtype=F64)
    mask = (torch.rand(shape) > 0.7).to(F64)  # 1 to 6 live weights in most blocks
    flat_mask = mask.reshape(-1)
    flat_mask[:10] = 1.0  # block 0 fully live: factorised on its full side
    flat_mask[10:20] = 0.0  # block 1 fully pruned
    flat_mask[20:30] = (torch.arange(10) < 7).to(F64)  # block 2: 7 live, side 8
    grads[:, 5, 1] = 0.0  # a dead input inside a live block
    block = BlockDiagonalBlock(shape, block_size=size, dtype=F64)
    accumulator = block.new_statistics()
    accumulator.update(DenseGradients(grads), mask=mask)
    block.init_from_statistics(accumulator.result(), damping=gamma)

    flat = (grads * mask).reshape(40, -1)
    fisher = flat.T @ flat / 40
    expected = torch.zeros(126, 126, dtype=F64)
    for start in range(0, 126, size):
        stop = min(start + size, 126)
        expected[start:stop, start:stop] = torch.linalg.inv(
            fisher[start:stop, start:stop] + gamma * torch.eye(stop - start, dtype=F64)
        )
    torch.testing.assert_close(block.to_dense(), expected)


def test_fishleg_streams_hold_masks_only_for_statistics_that_read_them() -> None:
    from lightning_fls.engine import PruningEngine
    from lightning_fls.fishleg import StructurePolicy
    from lightning_fls.layers import prunable_layers
    from lightning_fls.methods import FLS
    from lightning_fls.options import build_options

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    layers = prunable_layers(model)
    for method, masked in ((FLS(), set()), (FLS(structure=StructurePolicy("block_diagonal")),
                                             set(layers))):  # fmt: skip
        engine = PruningEngine(layers, build_options(method, sparsity=0.5), torch.device("cpu"))
        stream = engine.method.stream(engine)
        assert stream is not None
        assert set(stream.masks) == masked
