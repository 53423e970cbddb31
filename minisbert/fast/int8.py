"""int8 mode (opt-in, inexact): the arithmetic behind ``Linear``'s int8 backend.

The integer GEMM is exact (int32 sums); the error is the rounding of weights (one scale per output
channel) and activations (one scale per token, so a text's rows never depend on its batch).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

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


# Static int8 (opt-in, inexact; ``FastEncoder.observe`` / ``use_ranges``): each linear's input range
# measured once on calibration texts in fp32, then every input quantized with that fixed scale and
# zero point, as post-training static quantization (OpenVINO/NNCF's, PyTorch's PT2E) does. No per-token
# max, no rotation, and the scales go into oneDNN's int8 GEMM itself (bias, GELU and the residual add
# in its epilogue; the up-projection writes uint8 straight for the down-projection), so the passes
# around the int8 GEMMs mostly disappear. A row's result still depends on that row alone.
STATIC_LINEARS = ("qkv", "out", "up", "down")


def affine(low: float, high: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric uint8 covering [low, high] (widened to hold 0, which must be exact:
    pads and filler rows are zeros)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255
    return scale, int(min(255, max(0, round(-low / scale))))


def to_uint8(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """(N, K) float -> (N, K) uint8 round(x / scale) + zero, saturated: one fused pass of torch's quantizer,
    its quantized tensor's bytes read out by ``int_repr()`` (a copy, 1 byte per value; ``.view(torch.uint8)``
    leaves a tensor torch still treats as quantized)."""
    with warnings.catch_warnings():  # torch calls its quantized tensors deprecated; only their kernel is used
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(x, scale, zero, torch.quint8).int_repr()


class RangeObserver:
    """Running (min, max) of the inputs one linear layer sees, while ``FastEncoder.observe`` is on, and a
    sample of them (every ``SAMPLE_EVERY``-th row, up to ``SAMPLE_ROWS``) for ``keeps_static``."""

    def __init__(self):
        self.low, self.high = math.inf, -math.inf
        self.rows: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> None:
        self.low, self.high = min(self.low, float(x.min())), max(self.high, float(x.max()))
        if sum(len(r) for r in self.rows) < SAMPLE_ROWS:
            self.rows.append(x[::SAMPLE_EVERY].float().clone())


SAMPLE_ROWS, SAMPLE_EVERY = 2048, 7
# A linear goes static only where its input's static error on the calibration sample is at most this
# many times the dynamic mode's (per-token scales after the rotation): the base models with random
# weights measured 0.8-1.7x on every linear (all static), all-MiniLM-L6-v2's real outlier channels
# 2-11x. At 4 its q/k/v, attention-output and two FFN-down inputs go static: lowest cosine to fp32 0.9946,
# KorSTS test Spearman +0.04 (static everywhere: 0.956 and -0.93; OpenVINO's static int8: 0.946, +0.88).
# SmoothQuant's per-channel migration (alpha 0.5) did not rescue the FFN-down inputs (all static: 0.957)
# and costs a pass, so it is not used.
STATIC_ERROR_RATIO = 4.0


def quantization_errors(x: torch.Tensor, low: float, high: float) -> tuple[float, float]:
    """Relative error ||x' - x|| / ||x|| of (static: one uint8 scale for [low, high], dynamic: one int8
    scale per row after the block rotation, as the dynamic mode quantizes) on sample rows x (N, K)."""
    scale, zero = affine(low, high)
    static = (to_uint8(x, scale, zero).float() - zero) * scale
    h = hadamard(math.gcd(x.shape[1], ROTATION))
    turned = rotate(x, h)
    q, s = quantize_rows(turned.clone())
    dynamic = rotate(q.float() * s, h)  # h is its own inverse
    norm = x.norm().clamp(min=1e-30)
    return float((static - x).norm() / norm), float((dynamic - x).norm() / norm)


def keeps_static(observer: RangeObserver, ratio: float | None = None) -> bool:
    """Whether the observed input quantizes well enough with one static scale (``STATIC_ERROR_RATIO``)."""
    sample = torch.cat(observer.rows)
    static, dynamic = quantization_errors(sample, observer.low, observer.high)
    return static <= (STATIC_ERROR_RATIO if ratio is None else ratio) * dynamic


def dumps_ranges(ranges: list[dict[str, list[float]]]) -> str:
    """``observe``'s per-block ranges as the JSON text ``load_ranges`` reads (``minisbert quantize``)."""
    import json

    return json.dumps({"format": "minisbert-int8-ranges", "version": 1, "blocks": ranges})


def save_ranges(ranges: list[dict[str, list[float]]], path) -> None:
    from pathlib import Path

    Path(path).write_text(dumps_ranges(ranges))


def load_ranges(path) -> list[dict[str, list[float]]]:
    """The per-block ranges ``save_ranges`` wrote; a ValueError for any other JSON."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != "minisbert-int8-ranges":
        raise ValueError(f"{path} is not a minisbert int8 ranges file")
    blocks = data["blocks"]
    for block in blocks:
        if not set(block) <= set(STATIC_LINEARS) or any(len(v) != 2 for v in block.values()):
            raise ValueError(f"{path}: a block's entries are (min, max) for some of {STATIC_LINEARS}")
    return blocks
