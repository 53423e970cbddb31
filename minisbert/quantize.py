"""Quantized embeddings with sentence-transformers' ``quantize_embeddings`` arithmetic, for (N, D) float
arrays: what ``embed-corpus --precision`` writes.

- ``int8`` / ``uint8``: each dimension cut into 255 equal steps between its min and max (``ranges``,
  a (2, D) array; without it, the embeddings' own min and max, as sentence-transformers does):
  ``floor((x - min) / step)`` clipped to [0, 255], minus 128 for int8. A zero-width dimension takes
  step 1. Ranges are float32, as there.
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte, first dimension in
  the high bit (``np.packbits``); ``binary`` is that byte minus 128 as int8.
- ``float32``: a float32 copy.
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def quantize_embeddings(embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """(N, D) float ``embeddings`` in ``precision`` (one of ``PRECISIONS``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    embeddings = np.asarray(embeddings)
    if embeddings.dtype in (np.int8, np.uint8):
        raise ValueError("embeddings to quantize must be floats, not int8 or uint8")
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("binary"):
        packed = np.packbits(embeddings > 0, axis=-1)  # (N, ceil(D / 8)) uint8
        return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
    if ranges is None:
        if len(embeddings) < 2:
            raise ValueError(f"{precision} ranges cannot come from {len(embeddings)} embedding(s); pass ranges")
        ranges = np.stack([embeddings.min(axis=0), embeddings.max(axis=0)])
    ranges = np.asarray(ranges).astype(np.float32, copy=False)
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((embeddings - starts) / steps), 0, 255)  # 0..255
    return buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
