"""``encode``'s result as sentence-transformers returns it: an (N, D) array by default, one tensor with
``convert_to_tensor``, a list of per-text tensors with ``convert_to_numpy=False``; one row for one text."""

from __future__ import annotations

import numpy as np
import torch

from minisbert.encoding.arguments import EncodeCall
from minisbert.quantize import to_numpy


def convert(out, call: EncodeCall, device: torch.device | str):
    """``out`` (an (N, D) tensor or array, an empty 1-D tensor, or a list) converted as ``call`` asks;
    ``device``: where an empty tensor result lies (the model's, or the CPU after worker processes)."""
    if call.convert_to_tensor:
        if isinstance(out, torch.Tensor) or len(out):
            out = torch.as_tensor(out)
        else:
            out = torch.tensor([], device=device)
    elif call.convert_to_numpy:
        if not len(out):
            out = np.array([])
        elif isinstance(out, torch.Tensor):
            out = to_numpy(out)
    else:
        out = list(torch.from_numpy(out) if isinstance(out, np.ndarray) else out)
    return out[0] if call.single else out
