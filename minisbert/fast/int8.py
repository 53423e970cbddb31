"""int8 mode (opt-in, inexact): the arithmetic behind ``Linear``'s int8 backend.

The integer GEMM is exact (int32 sums); the error is the rounding of weights (one scale per output
channel) and activations (one scale per token, so a text's rows never depend on its batch).
"""

from __future__ import annotations

import functools
import logging
import math

import torch

log = logging.getLogger("minisbert")


# int8 mode (opt-in, inexact): the block's linears on int8 weights and activations, as a backend of
# ``Linear``. The integer GEMM is exact (int32 sums); the error is the rounding of weights (one scale per
# output channel) and activations (one scale per token, so a text's rows never depend on its batch).
# A few input channels of BERT-like models hold outliers (LayerNorm outputs: 5-10x a token's RMS; GELU
# outputs too), and one outlier sets the whole token's scale. Turning each 64 columns of the input by a
# Hadamard rotation (and the weight's the same way, so x W^T is unchanged) spreads them over the block:
# all-MiniLM-L6-v2 on KorSTS, lowest cosine to fp32 0.987 plain, 0.9986 rotated (QuaRot's idea).
# ``python scripts/tune_fast.py --model all-MiniLM-L6-v2 --n 512 --rotation-block 1,16,32,64,128`` prints
# each block size's lowest cosine to fp32 and its int8 encode time.
ROTATION = 64


@functools.cache
def onednn_int8_usable() -> bool:
    """Whether oneDNN's int8 linear (``torch.ops.onednn.qlinear_pointwise``) runs on this CPU."""
    try:
        w = torch.ops.onednn.qlinear_prepack(torch.ones(8, 8, dtype=torch.int8), None)
        torch.ops.onednn.qlinear_pointwise(torch.ones(2, 8, dtype=torch.int8), 1.0, 0, w, torch.ones(8),
                                           torch.zeros(8, dtype=torch.long), None, 1.0, 0, torch.float32,
                                           "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def hadamard(n: int) -> torch.Tensor:
    """(n, n) orthonormal Hadamard matrix, n a power of 2 (Sylvester's construction): H = H^T, H H^T = I."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K): x @ blockdiag(h, h, ...), each block of h's size of columns turned by h."""
    return (x.reshape(-1, h.shape[0]) @ h).view(x.shape)


def quantize_rows(x: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) int8 q and (N, 1) float32 scales s with x ~ q * s: one symmetric scale per
    row (a token's activations, or an output channel's weights), the row's max |x| mapped to 127.
    ``overwrite``: x is a temporary, scaled and rounded in place."""
    # max |x| from two reductions: x.abs() would write a temporary as large as x.
    amax = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_())  # (N, 1)
    s = amax.float().clamp_(min=1e-30) / 127  # an all-zero row gives q = 0
    scaled = x.mul_(1 / s) if overwrite else torch.mul(x, 1 / s)
    return scaled.round_().to(torch.int8), s  # round half to even, |q| <= 127
