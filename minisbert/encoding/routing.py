"""Where ``encode`` runs: in worker processes (``minisbert.workers``) for a ``pool`` or a list of devices,
else in this process, on ``device`` if one is given (the encoder moves there, as sentence-transformers'
``encode(device=...)`` does)."""

from __future__ import annotations

import torch

from minisbert import workers
from minisbert.encoding.inference import run_here


def run(encoder, texts: list[str], inference: dict, pool: dict | None, device, chunk_size: int | None):
    """``(out, device)``: ``run_here``'s result for ``texts``, and where an empty tensor result lies
    (the encoder's device, or the CPU where workers ran it)."""
    if pool is not None or (isinstance(device, list) and len(device) > 0):
        return workers.encode(encoder, texts, pool=pool, devices=device, chunk_size=chunk_size, **inference), "cpu"
    if device is not None and not isinstance(device, list):
        target = torch.empty(0, device=device).device  # canonical: "cpu:0" is "cpu"
        if target != encoder.device:
            encoder.to(target)
    return run_here(encoder, texts, **inference), encoder.device
