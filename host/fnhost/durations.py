"""Durations (``"250ms"``, ``"1m30s"``) and sizes (``"8MiB"``) as written in fn.yaml.

Plain numbers are seconds (durations) or bytes (sizes): ``${VAR}`` interpolation
yields strings, so ``"30"`` is accepted as well as ``30``.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "parse_duration", "parse_size"]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
}

_DURATION_HELP = "use a number and a unit (ms, s, m, h, d), like '250ms', '30s', '1m30s' or '7d'"
_SIZE_HELP = "use a number and a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), like '8MiB'"


def parse_duration(value: object) -> float:
    """Return ``value`` in seconds.

    Accepts ``"250ms"``, ``"5s"``, ``"2m"``, ``"24h"``, ``"7d"``, compounds such as
    ``"1m30s"``, and non-negative numbers (or numeric strings) meaning seconds.
    Raises ``ValueError`` naming the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration, got {value!r}; {_DURATION_HELP}")
    if isinstance(value, int | float):
        return _non_negative(float(value), value, _DURATION_HELP)
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {value!r}; {_DURATION_HELP}")
    return sum(
        float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)
    )


def parse_size(value: object) -> int:
    """Return ``value`` in bytes: ``"8MiB"`` is 8 * 1024**2, ``"8MB"`` is 8 * 1000**2.

    Units are case-insensitive; a plain number is bytes. Raises ``ValueError``.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a size, got {value!r}; {_SIZE_HELP}")
    if isinstance(value, int | float):
        number = _non_negative(float(value), value, _SIZE_HELP)
        multiplier = 1
    else:
        match = _SIZE.fullmatch(value.strip())
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"invalid size {value!r}; {_SIZE_HELP}")
        number = float(match.group(1))
        multiplier = _SIZE_UNITS[match.group(2).lower()]
    size = number * multiplier
    if size != int(size):
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
    return int(size)


def format_duration(seconds: float) -> str:
    """Seconds as fn.yaml writes them: ``90`` -> ``"1m30s"``, ``0.25`` -> ``"250ms"``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    parts = []
    remainder = seconds
    for unit in ("d", "h", "m"):
        count, remainder = divmod(remainder, _DURATION_UNITS[unit])
        if count:
            parts.append(f"{count:.0f}{unit}")
    if remainder or not parts:
        parts.append(f"{remainder:g}s")
    return "".join(parts)


def _non_negative(number: float, raw: object, help_text: str) -> float:
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"expected a non-negative finite number, got {raw!r}; {help_text}")
    return number
