"""Every block's Q·V and diag(Q) against an independently built dense matrix (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_fls.fishleg import (
    BlockDiagonalBlock,
    CurvatureBlock,
    DiagonalBlock,
    KroneckerBlock,
    LayerStatistics,
)

F64 = torch.float64
SHAPES = [(2, 4), (3, 1), (5, 3), (1, 7), (4, 4)]


def randomise(block: CurvatureBlock) -> CurvatureBlock:
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
        block.base_scale.fill_(0.7)
    return block


def dense_kronecker(block: KroneckerBlock) -> torch.Tensor:
    G_out = block.out_factor @ block.out_factor.T
    G_in = block.in_factor @ block.in_factor.T
    K = torch.kron(G_out, G_in)
    if block.scale is not None:
        d = block.scale.reshape(-1)
        K = d[:, None] * K * d[None, :]
    return block.base_scale * K


def dense_block_diagonal(block: BlockDiagonalBlock) -> torch.Tensor:
    full = torch.block_diag(*[L @ L.T for L in block.factors])
    return block.base_scale * full[: block.numel, : block.numel]


def dense_diagonal(block: DiagonalBlock) -> torch.Tensor:
    return block.base_scale * torch.diag(block.scale.reshape(-1) ** 2)


def make_blocks(shape: tuple[int, int]) -> list[tuple[CurvatureBlock, torch.Tensor]]:
    blocks: list[CurvatureBlock] = [
        KroneckerBlock(shape, use_scale=True, dtype=F64),
        KroneckerBlock(shape, dtype=F64),
        BlockDiagonalBlock(shape, block_size=3, dtype=F64),  # 3 does not divide most n here
        BlockDiagonalBlock(shape, block_size=1, dtype=F64),
        BlockDiagonalBlock(shape, block_size=50, dtype=F64),  # one padded block: full capacity
        DiagonalBlock(shape, dtype=F64),
    ]
    out = []
    for block in blocks:
        randomise(block)
        with torch.no_grad():
            if isinstance(block, KroneckerBlock):
                dense = dense_kronecker(block)
            elif isinstance(block, BlockDiagonalBlock):
                dense = dense_block_diagonal(block)
            else:
                assert isinstance(block, DiagonalBlock)
                dense = dense_diagonal(block)
        out.append((block, dense))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_qv_and_diag_match_dense(shape: tuple[int, int]) -> None:
    n = shape[0] * shape[1]
    for block, dense in make_blocks(shape):
        V = torch.randn(shape, dtype=F64)
        expected = (dense @ V.reshape(-1)).reshape(shape)
        torch.testing.assert_close(block.qv(V), expected, msg=f"{block!r}")
        # Batched products: leading dimensions are independent vectors.
        Vb = torch.randn(2, 3, *shape, dtype=F64)
        expected_b = (Vb.reshape(-1, n) @ dense.T).reshape(Vb.shape)
        torch.testing.assert_close(block.qv(Vb), expected_b)
        torch.testing.assert_close(block.diag_q(), torch.diagonal(dense).reshape(shape))
        torch.testing.assert_close(block.to_dense(), dense)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_q_is_symmetric_psd_by_construction(shape: tuple[int, int]) -> None:
    for block, _ in make_blocks(shape):
        Q = block.to_dense()
        torch.testing.assert_close(Q, Q.T)
        assert torch.linalg.eigvalsh(Q).min() >= -1e-10 * Q.abs().max()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_initial_q_is_scaled_identity(shape: tuple[int, int]) -> None:
    n = shape[0] * shape[1]
    for block, _ in make_blocks(shape):
        block.reset_parameters(2.5)
        torch.testing.assert_close(block.to_dense(), 2.5 * torch.eye(n, dtype=F64))
    fresh = KroneckerBlock(shape, init_scale=4.0, dtype=F64)
    torch.testing.assert_close(fresh.to_dense(), 4.0 * torch.eye(n, dtype=F64))


def test_products_are_differentiable_in_lambda() -> None:
    """Autograd through operator() agrees with central finite differences in every parameter."""
    shape, eps = (3, 4), 1e-6
    for block, _ in make_blocks(shape):
        V, W = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
        params = list(block.parameters())
        grads = torch.autograd.grad((block.operator()(V) * W).sum(), params)
        for param, grad in zip(params, grads, strict=True):
            direction = torch.randn_like(param)
            values = []
            with torch.no_grad():
                for sign in (1.0, -1.0):
                    param.add_(sign * eps * direction)
                    values.append(float((block.operator()(V) * W).sum()))
                    param.sub_(sign * eps * direction)
            numeric = (values[0] - values[1]) / (2 * eps)
            assert float((grad * direction).sum()) == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_state_dict_round_trip_is_exact() -> None:
    for block, _ in make_blocks((3, 5)):
        copy = (
            type(block)((3, 5), dtype=F64)
            if not isinstance(block, BlockDiagonalBlock)
            else (BlockDiagonalBlock((3, 5), block_size=block.block_size, dtype=F64))
        )
        if isinstance(block, KroneckerBlock) and block.scale is not None:
            copy = KroneckerBlock((3, 5), use_scale=True, dtype=F64)
        copy.load_state_dict(block.state_dict())
        V = torch.randn(3, 5, dtype=F64)
        assert torch.equal(copy.qv(V), block.qv(V))
        assert torch.equal(copy.diag_q(), block.diag_q())


def test_blocks_follow_module_to() -> None:
    block = KroneckerBlock((2, 3))
    assert block.dtype == torch.float32
    block = block.to(F64)
    assert block.dtype == F64
    assert block.out_factor.dtype == F64
    assert block.qv(torch.randn(2, 3)).dtype == F64  # input cast to the block's dtype


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: KroneckerBlock((0, 3)), "shape"),
        (lambda: KroneckerBlock((2, 3), init_scale=0.0), "init_scale"),
        (lambda: DiagonalBlock((2, 3), init_scale=-1.0), "init_scale"),
        (lambda: BlockDiagonalBlock((2, 3), block_size=0), "block_size"),
        (lambda: BlockDiagonalBlock((2, 3), init_scale=float("nan")), "init_scale"),
        (lambda: KroneckerBlock((2, 3), dtype=torch.int64), "dtype"),
    ],
)
def test_bad_arguments_name_the_argument(make, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_wrong_input_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 3\]"):
        KroneckerBlock((2, 3)).qv(torch.randn(3, 2))


def test_init_from_statistics_needs_its_statistics() -> None:
    with pytest.raises(ValueError, match="in_cov"):
        KroneckerBlock((2, 3)).init_from_statistics(LayerStatistics(), damping=0.1)
    with pytest.raises(ValueError, match="diag_fisher"):
        DiagonalBlock((2, 3)).init_from_statistics(LayerStatistics(), damping=0.1)
    stats = LayerStatistics(diag_fisher=torch.ones(2, 3))
    with pytest.raises(ValueError, match="damping"):
        DiagonalBlock((2, 3)).init_from_statistics(stats, damping=0.0)


def test_diagonal_inits_from_statistics_are_exact() -> None:
    diag = torch.rand(3, 4, dtype=F64)
    stats = LayerStatistics(diag_fisher=diag, num_examples=10)
    expected = torch.diag(1.0 / (diag.reshape(-1) + 0.3))
    for block in (
        DiagonalBlock((3, 4), dtype=F64),
        BlockDiagonalBlock((3, 4), block_size=5, dtype=F64),
    ):
        block.init_from_statistics(stats, damping=0.3)
        torch.testing.assert_close(block.to_dense(), expected)


def test_blocks_are_plain_modules_without_model_references() -> None:
    block = KroneckerBlock((2, 3))
    assert isinstance(block, nn.Module)
    assert set(block.state_dict()) == {"base_scale", "out_factor", "in_factor"}
    scaled = KroneckerBlock((2, 3), use_scale=True)
    assert set(scaled.state_dict()) == {"base_scale", "out_factor", "in_factor", "scale"}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_outer_qv_matches_dense(shape: tuple[int, int]) -> None:
    for block, dense in make_blocks(shape):
        x, y = torch.randn(3, shape[0], dtype=F64), torch.randn(3, shape[1], dtype=F64)
        outer = x[:, :, None] * y[:, None, :]
        expected = (outer.reshape(3, -1) @ dense.T).reshape(outer.shape)
        torch.testing.assert_close(block.outer_qv(x, y), expected)
