"""Moving and casting an encoder: every module of its pipeline, as ``nn.Module.to`` moves one."""

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
