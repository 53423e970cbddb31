"""Moving, casting and copying an encoder: every module of its pipeline moved as ``nn.Module.to`` moves
one, and what a pickled or deep-copied encoder carries (``copy.deepcopy``, ``pickle``, and the worker
processes of ``minisbert.encoding.workers``, which receive the encoder pickled)."""

from __future__ import annotations

import torch

from minisbert.checks import check_quantize


def move(encoder, *args, **kwargs) -> None:
    """``encoder``'s modules moved and/or cast with ``nn.Module.to``'s arguments (``"cuda"``,
    ``torch.float16``, ``("cpu", torch.bfloat16)``); the packed path rebuilt for the new device and dtype."""
    if encoder.quantize:  # int8 runs on the CPU in float32: refuse a move before making it
        probe = torch.empty(0, device=encoder.device, dtype=encoder.dtype).to(*args, **kwargs)
        check_quantize(encoder.quantize, probe.device, probe.dtype)
    for module in encoder.pipeline():
        module.to(*args, **kwargs)
    encoder.rebuild_runner()


def cuda_device(device: int | str | torch.device | None) -> str | torch.device:
    """``nn.Module.cuda``'s argument as a device: an index, a device, or None (the current CUDA device)."""
    return torch.device("cuda", device) if isinstance(device, int) else device or "cuda"


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
