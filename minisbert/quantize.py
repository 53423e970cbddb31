"""Quantized embeddings, as sentence-transformers' ``quantize_embeddings`` makes them (same arithmetic,
so the bytes are equal): the standard way to shrink a vector index.

- ``int8`` / ``uint8``: each dimension cut into 255 equal steps between its minimum and maximum
  (``ranges``, a (2, D) array; else computed from ``calibration_embeddings``; else, not recommended,
  from the embeddings themselves): ``floor((x - min) / step)`` clipped to [0, 255], minus 128 for int8.
  The ranges are float32 and a zero-width dimension takes step 1, as there.
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte (``np.packbits``,
  first dimension in the high bit); ``binary`` is the packed byte minus 128 as int8.
- ``float32``: a float32 copy.

A list of (tokens, D) matrices (token embeddings) is quantized matrix by matrix with ranges shared by
all of them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("minisbert")

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the host; bfloat16 (which numpy lacks) as float32."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def quantize_embeddings(embeddings, precision: str, ranges: np.ndarray | None = None,
                        calibration_embeddings: np.ndarray | None = None):
    """``embeddings`` (array, tensor, or list of vectors or of (tokens, D) matrices) in ``precision``:
    a numpy array, or a list of arrays for a list of matrices."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = to_numpy(embeddings)
    elif isinstance(embeddings, list):
        if not embeddings:
            return []
        if isinstance(embeddings[0], torch.Tensor):
            embeddings = [to_numpy(e) for e in embeddings]
        if isinstance(embeddings[0], np.ndarray) and embeddings[0].ndim == 2:
            # Token embeddings: one set of ranges for all the matrices.
            if precision.endswith("int8") and ranges is None:
                data = np.concatenate(embeddings, axis=0) if calibration_embeddings is None else calibration_embeddings
                if len(data):
                    ranges = quantization_ranges(data, precision, calibration_embeddings)
            return [quantize_embeddings(m, precision, ranges, calibration_embeddings) for m in embeddings]
        embeddings = np.array(embeddings)
    if embeddings.dtype in (np.uint8, np.int8):
        raise ValueError("Embeddings to quantize must be float rather than int8 or uint8.")

    if embeddings.ndim == 2 and embeddings.shape[0] == 0:  # nothing to calibrate: the empty result's shape
        dim = embeddings.shape[1]
        if precision.endswith("int8"):
            return np.zeros((0, dim), dtype=np.int8 if precision == "int8" else np.uint8)
        if precision.endswith("binary"):
            return np.zeros((0, (dim + 7) // 8), dtype=np.int8 if precision == "binary" else np.uint8)

    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("int8"):
        if ranges is None:
            ranges = quantization_ranges(embeddings, precision, calibration_embeddings)
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    if precision == "binary":
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(embeddings > 0, axis=-1)
    raise ValueError(f"Precision {precision!r} is not supported")


def quantization_ranges(embeddings: np.ndarray, precision: str,
                        calibration_embeddings: np.ndarray | None) -> np.ndarray:
    """(2, D): per-dimension minimum and maximum of the calibration embeddings, else of ``embeddings``."""
    if calibration_embeddings is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(f"Cannot compute {precision} quantization ranges from a single embedding. "
                             f"Call `quantize_embeddings` with `ranges` or `calibration_embeddings` "
                             f"from a representative set of embeddings instead.")
        if embeddings.shape[0] < 100:
            log.warning("Computing %s quantization buckets based on %d embeddings. %s quantization is more "
                        "stable with `ranges` calculated from more embeddings or a `calibration_embeddings` "
                        "that can be used to calculate the buckets.", precision, len(embeddings), precision)
        calibration_embeddings = embeddings
    return np.vstack((np.min(calibration_embeddings, axis=0), np.max(calibration_embeddings, axis=0)))
