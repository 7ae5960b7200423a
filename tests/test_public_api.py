from __future__ import annotations

import lightning_fls


def test_public_api_is_importable_and_documented() -> None:
    for name in lightning_fls.__all__:
        obj = getattr(lightning_fls, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"
    assert lightning_fls.__version__
