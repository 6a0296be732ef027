"""Checkpoint download, verification and loading; fast inference; the command-line tools."""
from .optimize import optimize_for_inference

__all__ = ["optimize_for_inference"]
