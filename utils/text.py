"""How messages show a list that may be long: its first few items, then "...", the same everywhere."""
from __future__ import annotations

from collections.abc import Iterable


def first(items: Iterable, n: int = 5, sep: str = ", ") -> str:
    """``items`` joined by ``sep``, cut after the first ``n`` with "...": ``a, b, c, ...``."""
    items = [str(item) for item in items]
    return sep.join(items[:n] + (["..."] if len(items) > n else []))
