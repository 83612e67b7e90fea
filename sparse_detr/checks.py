"""The range and choice checks every config dataclass runs in `__post_init__`.

On the lowest floor with `errors.py` (it imports nothing else of the package), so the schemas of
`config.py`, `data/config.py` and `tracking.py` use them without importing each other.
"""
from __future__ import annotations

from typing import Any, Sequence

from sparse_detr.errors import ConfigError


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_range(key: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    if value != value:  # NaN: every comparison below is False, so it would pass them all
        raise ConfigError(f"{key}={value!r} is not a number; give a finite value")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r} is out of range; valid: {lo}, {hi}")
