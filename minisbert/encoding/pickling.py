"""What a pickled or deep-copied encoder carries (``copy.deepcopy``, ``pickle``, and the worker processes
of ``minisbert.workers``, which receive the encoder pickled)."""

from __future__ import annotations


def getstate(encoder) -> dict:
    """The encoder's attributes without the packed runner: it holds oneDNN's prepacked weights (opaque
    tensors that neither pickle nor copy) and caches. Whether it was on travels instead."""
    state = dict(encoder.__dict__, _packed=None)
    state["_fast_setting"] = encoder._packed is not None
    return state


def setstate(encoder, state: dict) -> None:
    """The attributes restored, and the packed runner rebuilt from the copied model with the same setting."""
    state = dict(state)
    fast = state.pop("_fast_setting")
    encoder.__dict__.update(state)
    encoder.fast = fast
