from __future__ import annotations

import pytest
import torch

import lightning_fls._linalg as linalg
from lightning_fls._linalg import (
    FallbackCounter,
    batched,
    damped_inverse,
    damped_inverse_root,
    lower_triangular_inverse,
    native_bfloat16_products,
)


def test_batched_equals_the_plain_call_and_restores_threads() -> None:
    torch.manual_seed(0)
    x = torch.randn(301, 6, 9, dtype=torch.float64)
    spd = x @ x.mT + 0.1 * torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(301, 6, 2, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.testing.assert_close(batched(torch.linalg.solve, spd, rhs), torch.linalg.solve(spd, rhs))
    inverse = batched(lambda m: torch.cholesky_inverse(torch.linalg.cholesky(m)), spd)
    torch.testing.assert_close(inverse, torch.linalg.inv(spd))
    assert torch.get_num_threads() == threads
    small = spd[:3]
    torch.testing.assert_close(batched(torch.linalg.cholesky, small), torch.linalg.cholesky(small))


def test_batched_default_chunks_cover_every_entry_also_in_place() -> None:
    torch.manual_seed(1)
    x = torch.randn(301, 40, 41, dtype=torch.float64)  # 40×40 float64: several default chunks
    spd = x @ x.mT + 0.1 * torch.eye(40, dtype=torch.float64)
    expected = torch.linalg.cholesky(spd)
    torch.testing.assert_close(batched(torch.linalg.cholesky, spd), expected)
    in_place = spd.clone()
    result = batched(torch.linalg.cholesky, in_place, out=in_place)
    assert result.data_ptr() == in_place.data_ptr()
    torch.testing.assert_close(in_place, expected)


def test_damped_inverse_equals_the_dense_inverse_and_floors_indefinite_matrices() -> None:
    torch.manual_seed(0)
    X = torch.randn(5, 6, 3, dtype=torch.float64)
    psd = X @ X.transpose(1, 2)  # rank 3 of 6: singular without the damping
    expected = torch.linalg.inv(psd + 0.2 * torch.eye(6, dtype=torch.float64))
    with FallbackCounter() as counter:
        torch.testing.assert_close(damped_inverse(psd.float(), 0.2), expected, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    assert counter.count == 0
    indefinite = psd.clone()
    indefinite[2] -= 5.0 * torch.eye(6, dtype=torch.float64)  # eigenvalues below -γ
    with FallbackCounter() as counter:
        out = damped_inverse(indefinite, 0.2)
    assert counter.count == 1
    torch.testing.assert_close(out[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])
    eigenvalues, vectors = torch.linalg.eigh(indefinite[2])
    floored = eigenvalues.clamp_min(0.0) + 0.2  # the relative floor (1e-12 of the top) is lower
    torch.testing.assert_close(out[2], vectors @ torch.diag(1 / floored) @ vectors.T)


@pytest.mark.parametrize("side", [7, 16, 37])
def test_lower_triangular_inverse_equals_the_dense_inverse_across_the_recursion(
    side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linalg, "TRIANGULAR_INVERSE_BASE", 4)  # 37 → 18/19 → 9/10 → 4/5 → …
    torch.manual_seed(side)
    lower = torch.randn(3, side, side, dtype=torch.float64).tril()
    lower.diagonal(dim1=1, dim2=2).copy_(1.0 + torch.rand(3, side, dtype=torch.float64))
    noisy = lower + torch.randn_like(lower).triu(1)  # the upper triangle must be ignored
    inverse = lower_triangular_inverse(noisy)
    torch.testing.assert_close(inverse, torch.linalg.inv(lower))
    assert bool((inverse.triu(1) == 0).all())


def test_damped_inverse_root_through_the_recursion_keeps_the_fallback_per_matrix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linalg, "TRIANGULAR_INVERSE_BASE", 8)
    torch.manual_seed(2)
    X = torch.randn(3, 30, 12, dtype=torch.float64)
    psd = X @ X.mT  # rank 12 of 30
    psd[1] -= 3.0 * torch.eye(30, dtype=torch.float64)  # indefinite: Cholesky fails
    with FallbackCounter() as counter:
        root = damped_inverse_root(psd, 0.1)
    assert counter.count == 1
    torch.testing.assert_close(root @ root.mT, damped_inverse(psd, 0.1))
    assert bool((root[[0, 2]].tril(-1) == 0).all())  # R = L⁻ᵀ: upper triangular


def test_native_bfloat16_products_reads_the_cpu_probes_and_survives_their_absence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert linalg.native_bfloat16_products(torch.device("cpu")) is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert native_bfloat16_products(torch.device("cpu")) is False
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert native_bfloat16_products(torch.device("cpu")) is False  # a torch without the probe
    assert native_bfloat16_products(torch.device("meta")) is False
