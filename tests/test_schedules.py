from __future__ import annotations

import pytest

from lightning_fls import SparsitySchedule, cubic_sparsity, linear_sparsity


def test_cubic_schedule_matches_zhu_gupta_and_its_endpoints() -> None:
    s = SparsitySchedule("cubic", 0.9, start=2, end=6)
    assert s(0) == 0.0
    assert s(2) == 0.0
    for t in [3, 4, 5]:
        expected = 0.9 * (1 - (1 - (t - 2) / 4) ** 3)
        assert s(t) == pytest.approx(expected)
    assert s(6) == pytest.approx(0.9)
    assert s(50) == pytest.approx(0.9)
    # fast early, gentle late
    assert s(3) - s(2) > s(6) - s(5)
    assert cubic_sparsity(4, 2, 6, 0.9, initial=0.5) == pytest.approx(0.9 - 0.4 * 0.125)


def test_linear_and_oneshot_schedules() -> None:
    assert SparsitySchedule("linear", 0.8, 0, 4)(1) == pytest.approx(0.2)
    assert linear_sparsity(10, 0, 4, 0.8) == pytest.approx(0.8)
    oneshot = SparsitySchedule("oneshot", 0.7, 1, 2)
    assert oneshot(0.5) == 0.0
    assert oneshot(1) == 0.7
    assert oneshot(9) == 0.7


def test_callable_schedule_is_checked() -> None:
    SparsitySchedule(lambda t: min(0.1 * t, 0.5), 0.5, 0, 5).check([0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="never decrease"):
        SparsitySchedule(lambda t: 0.5 if t < 2 else 0.1, 0.5, 0, 5).check([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"schedule\(3\).*\[0, 1\)"):
        SparsitySchedule(lambda t: 0.4 * t, 0.5, 0, 5).check([0, 1, 2, 3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "exponential"}, "schedule.*cubic"),
        ({"target_sparsity": 1.0}, r"target_sparsity.*\[0, 1\)"),
        ({"start": 3, "end": 3}, "end_epoch.*greater"),
    ],
)
def test_schedule_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"schedule": "cubic", "target_sparsity": 0.5, "start": 0, "end": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SparsitySchedule(**args)  # type: ignore[arg-type]
