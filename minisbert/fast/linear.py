"""The fast path's linear layers: one weight prepared once per backend.

- ``mkldnn``: oneDNN with pre-packed weights (``torch.ops.mkldnn._linear_pointwise``, exact GELU
  fused into the up-projection, the residual added in the GEMM's epilogue) on CPUs with AVX-512 or
  AMX; ``aten``: ``F.linear`` (MKL sgemm) elsewhere, where it measured faster;
  ``MINISBERT_LINEAR=aten|mkldnn`` overrides;
- ``int8`` (opt-in, inexact): int8 weights and per-token int8 activations (``fast/int8.py``).
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from minisbert.fast.cpu import CpuKind, cpu_kind
from minisbert.fast.int8 import ROTATION, affine, hadamard, onednn_int8_usable, quantize_rows, rotate, to_uint8
from minisbert.models.bert import ACTIVATIONS

log = logging.getLogger("minisbert")


def mkldnn_usable(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked linear runs for ``dtype`` on this CPU (bf16 needs AVX-512 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), w, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return True


def native_half(dtype: torch.dtype, cpu: CpuKind | None = None) -> bool:
    """Whether ``dtype`` (bf16 or fp16) GEMMs run natively on this CPU (``cpu``: the flags to judge by;
    None: this machine's). oneDNN refuses them without AVX-512 or AMX; with AVX-512 but without
    AVX512_BF16 or AMX-BF16 it runs bf16 emulated, several times slower than fp32."""
    if not mkldnn_usable(dtype):
        return False
    return dtype != torch.bfloat16 or (cpu or cpu_kind()).native_bf16 is not False


def default_linear_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``aten`` (F.linear) or ``mkldnn``; env ``MINISBERT_LINEAR`` overrides the measured default."""
    choice = os.environ.get("MINISBERT_LINEAR", "").strip().lower()
    if device.type != "cpu":
        return "aten"
    if choice in ("aten", "mkldnn"):
        return choice if choice == "aten" or mkldnn_usable(dtype) else "aten"
    # Measured (scripts/bench.py, README "Performance"): on AVX-512 CPUs oneDNN's prepacked fp32 linear
    # runs at 200-225 GFLOP/s for BERT's shapes against 150-200 for MKL's sgemm behind F.linear (AMD
    # EPYC with AVX-512, 2 cores), and bf16 at ~440. On an AVX2-only EPYC oneDNN was 10-20% slower than MKL
    # and refuses bf16, so MKL there.
    if torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) and mkldnn_usable(dtype):
        return "mkldnn"
    return "aten"


# oneDNN keeps a primitive (JIT code and buffers) per input shape it has seen: one shape per batch's
# token count grew the process by 2.4 GB over 100k texts (``python scripts/memory_bench.py --n 100000``
# before the rows were rounded). Row counts are multiples of ROWS (the packed layout is padded once per
# forward, ``Packing(rows_multiple=...)``), which bounds the shapes and keeps every GEMM above 1 row,
# the one count oneDNN rounds differently.
ROWS = 32
# MKL picks other kernels (other rounding) for a few rows: 1-3, 5-7 and 9-11 rows differ from the same
# rows inside a larger GEMM on AMD Zen 3/4, 1-8 and 12-15 on an Intel Xeon with AMX (1-15 at BERT's
# shapes in a later run; ``python scripts/tune_fast.py --mkl-rows`` prints the counts on this CPU). Zero rows
# up to MKL_ROWS keep a text's embedding the same whatever else shares its batch.
MKL_ROWS = 16


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, K) -> (rows, K) with zero rows appended (x itself when N == rows)."""
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


class Linear:
    """y = x W^T + b with the weight prepared once for the chosen backend; ``act`` is fused if it can be.

    int8 only: ``rotation_block`` is the Hadamard block of ``rotate_input`` (1: none); ``onednn`` and
    ``packed_rotation`` pick oneDNN's int8 GEMM over ``torch._int_mm`` and oneDNN's fp32 GEMM for the
    rotation over ``x @ h`` (None: wherever they run here), so each kernel can be tested against the other.
    ``input_range`` (min, max): static int8 (``fast/int8.py``): the input quantized with that fixed uint8
    scale, no rotation, bias and exact GELU in oneDNN's epilogue; ``output_range``: the output written as
    uint8 in that range (the next linear's input); an input already uint8 is taken as it is.
    ``observe``: called with every input (``FastEncoder.observe``)."""

    observe = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, act: str | None = None,
                 rotate_input: bool = False, rotation_block: int = ROTATION, onednn: bool | None = None,
                 packed_rotation: bool | None = None, input_range: tuple[float, float] | None = None,
                 output_range: tuple[float, float] | None = None):
        self.backend = backend
        self.act = act
        self.bias = bias
        if backend == "mkldnn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        elif backend == "int8" and input_range is not None:
            if not onednn_int8_usable():
                raise ValueError("static int8 needs oneDNN's int8 linear (AVX512_VNNI / AMX-INT8 or AVX2 CPUs)")
            self.in_q = affine(*input_range)  # (scale, zero point)
            self.out_q = affine(*output_range) if output_range is not None else None
            q, scale = quantize_rows(weight)  # (out, in) int8, (out, 1): one scale per output channel
            self.scale = scale.squeeze(1)
            self.weight = torch.ops.onednn.qlinear_prepack(q, None)
            self.zero = torch.zeros_like(self.scale, dtype=torch.long)
            # oneDNN's gelu post-op with algorithm "none" is gelu_erf, the exact GELU of F.gelu's default.
            self.post = "gelu" if act == "gelu" else "none"
            self.backend = "int8-static"
        elif backend == "int8":
            # ``rotate_input``: each input turned by a block Hadamard rotation before it is quantized (see
            # ROTATION), the weight's columns the same way once here. Blocks of 64 columns, fewer if K needs.
            self.rotation = hadamard(math.gcd(weight.shape[1], rotation_block)) if rotate_input else None
            if self.rotation is not None:
                weight = rotate(weight, self.rotation)
            q, scale = quantize_rows(weight)  # (out, in) int8, (out, 1): one scale per output channel
            self.scale = scale.squeeze(1)  # (out,)
            self.onednn = onednn_int8_usable() if onednn is None else onednn
            # The rotation as oneDNN's prepacked fp32 GEMM on (N * K / 64, 64) rows where it runs: the same
            # values as ``x @ h`` here, and BERT base's int8 encode 6% faster (median of 5 interleaved passes).
            packed_rotation = mkldnn_usable() if packed_rotation is None else packed_rotation
            self.rotation_packed = torch.ops.mkldnn._reorder_linear_weight(self.rotation.t().contiguous()) \
                if self.rotation is not None and packed_rotation else None
            if self.onednn:  # VNNI / AMX-INT8 kernels, weights pre-packed
                self.weight = torch.ops.onednn.qlinear_prepack(q, None)
                self.zero = torch.zeros_like(self.scale, dtype=torch.long)
            else:
                self.weight = q.t().contiguous()  # (in, out) for torch._int_mm
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        if self.observe is not None:
            self.observe(x)
        if self.backend in ("mkldnn", "int8", "int8-static"):  # a multiple of ROWS rows (see there)
            run = {"int8": self._int8, "mkldnn": self._onednn, "int8-static": self._static}[self.backend]
            if N % ROWS:
                return run(pad_rows(x, -(-N // ROWS) * ROWS))[:N]
            return run(x)
        if N < MKL_ROWS:  # at least MKL_ROWS rows (see there)
            return self(pad_rows(x, MKL_ROWS))[:N]
        y = F.linear(x, self.weight, self.bias)
        return ACTIVATIONS[self.act](y) if self.act else y

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + (x W^T + b), for a layer without activation. oneDNN adds the residual in the GEMM's
        epilogue (a "sum" post-op: bitwise the same as the separate add, one pass over memory less)."""
        if self.backend == "mkldnn" and not self.act and x.shape[0] % ROWS == 0:
            if self.observe is not None:
                self.observe(x)
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        if self.backend == "int8-static" and self.post == "none" and self.out_q is None and x.shape[0] % ROWS == 0:
            scale, zero = self.in_q
            q = self._quantized(x)
            return torch.ops.onednn.qlinear_pointwise.binary(q, scale, zero, self.weight, self.scale, self.zero,
                                                             residual, self.bias, 1.0, 0, torch.float32, 1.0, 0,
                                                             "add", 1.0, "none", [], "")
        return self(x).add_(residual)

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x W^T + b) * other, for a layer without activation (a GLU's gate); oneDNN multiplies in the
        GEMM's epilogue (a "mul" post-op), so the product costs no pass of its own."""
        if self.backend == "mkldnn" and not self.act and x.shape[0] % ROWS == 0:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.weight, self.bias, "mul")
        return self(x).mul_(other)

    def add_(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += x W^T + b in place (static int8: oneDNN's "sum" post-op accumulates into it)."""
        if self.backend == "int8-static" and self.post == "none" and self.out_q is None and x.shape[0] % ROWS == 0 \
                and residual.is_contiguous():
            scale, zero = self.in_q
            return torch.ops.onednn.qlinear_pointwise.binary(self._quantized(x), scale, zero, self.weight, self.scale,
                                                             self.zero, residual, self.bias, 1.0, 0, torch.float32,
                                                             1.0, 0, "sum", 1.0, "none", [], "")
        return residual.add_(self(x))

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) float or uint8 -> (N, K) uint8 at the calibrated scale."""
        return x if x.dtype == torch.uint8 else to_uint8(x, *self.in_q)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.in_q
        q = self._quantized(x)  # (N, K) uint8
        out_scale, out_zero, out_dtype = (*self.out_q, None) if self.out_q else (1.0, 0, torch.float32)
        y = torch.ops.onednn.qlinear_pointwise(q, scale, zero, self.weight, self.scale, self.zero, self.bias,
                                               out_scale, out_zero, out_dtype, self.post, [], "none")
        return ACTIVATIONS[self.act](y) if self.act and self.post == "none" else y

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        rotated = self.rotation is not None
        # Either way the rotation makes a new tensor, which quantize_rows then scales and rounds in place.
        if rotated and self.rotation_packed is not None:
            x = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.rotation.shape[0]), self.rotation_packed, None,
                                                   "none", [], "").view(x.shape)
        elif rotated:
            x = rotate(x, self.rotation)
        q, s = quantize_rows(x, overwrite=rotated)  # (N, K) int8, (N, 1): one scale per token
        if self.onednn:
            # int32 sums times the weight's per-channel scales, out in float32; then the token's scale and
            # the bias in one pass (oneDNN's int8 linear takes one activation scale per tensor, not per row).
            y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.weight, self.scale, self.zero, None, 1.0, 0,
                                                   torch.float32, "none", [], "")
        else:
            y = torch._int_mm(q, self.weight).float().mul_(self.scale)  # (N, out)
        y = torch.addcmul(self.bias, y, s, out=y) if self.bias is not None else y.mul_(s)
        return ACTIVATIONS[self.act](y) if self.act else y

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "gelu":
            # oneDNN's gelu_erf post-op: exact GELU, the same function as F.gelu's default.
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "none")
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return ACTIVATIONS[self.act](y) if self.act else y
