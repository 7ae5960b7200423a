from __future__ import annotations

import torch

from lightning_fls._linalg import batched


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
