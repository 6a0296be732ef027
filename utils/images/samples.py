"""The sample photos that ship with the repository (utils/samples/, with their licenses)."""
from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def sample_photos() -> list[Path]:
    """The bundled sample photos, in name order."""
    return sorted(SAMPLES.glob("*.[jp][pn]g"))
