"""Undo copies of parameters in a temporary file: exact round trips, and memory when no file."""

from __future__ import annotations

import pytest
import torch

from lightning_fls import _parameter_store
from lightning_fls._parameter_store import ParameterStore


def values() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "weight": torch.randn(5, 7),
        "half": torch.randn(3, 4).to(torch.bfloat16),
        "mask": torch.rand(4, 6) > 0.5,
        "index": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "strided": torch.randn(6, 8)[:, ::2],  # not contiguous
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].device == value.device, name
        assert torch.equal(got[name], value), name


def test_values_come_back_exactly_as_fresh_copies() -> None:
    want = values()
    with ParameterStore() as store:
        store["a"] = want
        store["b"] = {"weight": want["weight"] * 2}
        assert store.on_disk
        assert len(store) == 2
        assert set(store) == {"a", "b"}
        assert "a" in store
        assert "c" not in store
        got = store["a"]
        assert_same(got, want)
        got["weight"].zero_()  # a copy: the stored value does not change
        assert_same(store["a"], want)
        assert torch.equal(store["b"]["weight"], want["weight"] * 2)
        store["a"] = {"weight": want["weight"] + 1}  # replaced
        assert torch.equal(store["a"]["weight"], want["weight"] + 1)
        del store["b"]
        assert list(store) == ["a"]
        file = store._file
        assert file is not None
    assert file.closed  # the file is gone once the store is closed
    assert len(store) == 0


def test_a_value_written_is_not_changed_by_later_writes_to_its_source() -> None:
    source = torch.randn(4, 4, requires_grad=True)
    original = source.detach().clone()
    with ParameterStore() as store:
        store["layer"] = {"weight": source}
        with torch.no_grad():
            source.add_(1.0)
        assert torch.equal(store["layer"]["weight"], original)


def test_without_a_temporary_file_the_values_stay_in_memory_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    want = values()
    with ParameterStore() as store:
        store["on disk"] = {"weight": want["weight"]}

        def no_space(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store._file, "write", no_space)
        with pytest.warns(RuntimeWarning, match="TMPDIR"):
            store["in memory"] = want
        assert not store.on_disk
        store["later"] = {"weight": want["weight"] * 3}  # no second warning, also in memory
        assert_same(store["in memory"], want)
        assert torch.equal(store["on disk"]["weight"], want["weight"])
        assert torch.equal(store["later"]["weight"], want["weight"] * 3)
        assert set(store) == {"on disk", "in memory", "later"}


def test_no_file_is_made_until_a_value_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    real = _parameter_store.tempfile.TemporaryFile

    def counted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        made.append(real(*args, **kwargs))  # type: ignore[call-overload]
        return made[-1]

    monkeypatch.setattr(_parameter_store.tempfile, "TemporaryFile", counted)
    with ParameterStore() as store:
        assert made == []
        store["a"] = {"weight": torch.ones(2)}
        store["b"] = {"weight": torch.zeros(2)}
        assert len(made) == 1
