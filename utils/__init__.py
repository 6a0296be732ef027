"""The commands (``python -m utils.<command>``) and the library beneath them; see "How the code is
laid out" in the README. ``utils.optimize_for_inference`` is ``utils.inference.optimize``'s, imported on
first use so that loading a model imports none of the fast-inference code."""


def __getattr__(name: str):
    if name == "optimize_for_inference":
        from utils.inference.optimize import optimize_for_inference

        return optimize_for_inference
    raise AttributeError(f"module 'utils' has no attribute {name!r}")


__all__ = ["optimize_for_inference"]
