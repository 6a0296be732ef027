"""How far one model's outputs are from another's: the one measure that the export's check, INT8's
fidelity and the benchmark's last column all report."""
from __future__ import annotations

from torch import Tensor


def relative_error(got: Tensor | list[Tensor], expected: Tensor | list[Tensor]) -> float:
    """The largest difference between ``got`` and ``expected``, relative to the largest of ``expected``;
    for lists of outputs (feature maps), the largest over them."""
    got, expected = ([o] if isinstance(o, Tensor) else list(o) for o in (got, expected))
    return max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)) for g, e in zip(got, expected))
