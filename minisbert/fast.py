"""Fast inference paths, kept beside the reference models and tested against them.

The reference forward (``minisbert/models/*.py``) runs every row of a padded (B, T) batch through every
linear layer. The fast path here runs the same math on the real tokens only:

- **unpadded (packed) tokens**: embeddings, every linear, GELU, LayerNorm and the residuals run on
  (N, C) with N = the number of real tokens in the batch; only attention needs a padded layout, so
  q/k/v are gathered into padded (b, T) buffers for ``scaled_dot_product_attention`` (pads copy a
  real token; the same padding bias as the reference masks them) and gathered back. A batch may hold
  several groups of texts, each padded to its own length: the linears see all their tokens at once,
  attention runs per group; a group without pads is a view of the packed tokens, not a gather;
- **one fused q/k/v linear** (C -> 3C) instead of three, so each block runs four GEMMs of good shape;
- **linears**: oneDNN with pre-packed weights (``torch.ops.mkldnn._linear_pointwise``, exact GELU
  fused into the up-projection) on CPUs with AVX-512 or AMX, ``F.linear`` (MKL sgemm) elsewhere,
  where it measured faster; ``MINISBERT_LINEAR=aten|mkldnn`` overrides;
- DeBERTa-v2's c2p/p2c terms are folded into the additive attention bias of the same
  ``scaled_dot_product_attention`` call; where every distance keeps its own table row (short texts)
  they are strided views of the relative-score GEMMs' outputs, not gathers (``diagonals``);
- the sentence embedding is pooled straight from the packed tokens (``kernels.packed_mean_pool``);
- ``PackedRunner`` is the ``runner`` interface over it: batches by ``token_batches`` (longest first
  by token count, filled to a token budget), texts grouped by padded length and fullness per batch;
- ``raise_mmap_threshold``: glibc's malloc keeps tensors up to 32 MiB on its heap, so the GEMM
  outputs reuse memory instead of being page-faulted in fresh every layer.

On CUDA the same packed forward runs in the model's dtype (fp16/bf16) with a torch.compile'd pooling
kernel; nothing here is required on the CPU-only machines the tests run on.

Shape legend: B batch, T tokens (padded), N real tokens in the batch, C hidden, H heads, D head dim.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from minisbert import kernels
from minisbert.cpu import cpu_kind
from minisbert.models.bert import ACTIVATIONS, BertModel, padding_bias
from minisbert.models.deberta_v2 import DebertaV2Model, RelativePositions, relative_positions
from minisbert.pooling import pool
from minisbert.runner import padded_length
from minisbert.tokenizer import pad_ids

log = logging.getLogger("minisbert")


_HEAP_PRIMED = []
# glibc's ceiling for its dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
MMAP_THRESHOLD_MAX = 32 << 20


def raise_mmap_threshold() -> None:
    """Free one block of just under 32 MiB, once per process, so malloc serves the fast path's tensors
    from its heap instead of fresh page-faulted mappings. ``MINISBERT_HEAP=0`` turns it off.

    glibc maps blocks above its mmap threshold (128 KiB at start) on their own and unmaps them on free;
    every new tensor that size is then zero-filled by the kernel one 4 KiB page fault at a time. glibc
    raises the threshold to the largest mapped block freed so far (at most 32 MiB) and returns heap
    memory above twice that. The packed forward's biggest tensors are a few GEMM outputs of 12-38 MB, so
    on its own the threshold settles low and the heap is trimmed and refilled every layer: BERT base,
    256 texts, 510k page faults and 1.2 s of system time per 8.1 s ``encode``; primed, ~0 faults and
    7.7 vs 8.3 s (medians of 4 alternating process pairs). Freeing one 32 MiB block sets the threshold
    to its maximum, as glibc does itself after any such free; nothing else changes (the threshold stays
    dynamic, no ``mallopt``). Elsewhere (musl, macOS) it is one allocation freed.
    """
    if _HEAP_PRIMED or os.environ.get("MINISBERT_HEAP", "1") == "0":
        return
    _HEAP_PRIMED.append(True)
    # Two at once: if the heap happens to hold a free block that large, the first one takes it and the
    # second is mapped. Under the ceiling with malloc's header; empty() leaves the pages untouched.
    blocks = [torch.empty(MMAP_THRESHOLD_MAX - (1 << 16), dtype=torch.uint8) for _ in range(2)]
    del blocks


def token_batches(ids: list[list[int]], batch_size: int, max_seq_length: int) -> list[list[int]]:
    """Indices of the texts in batches for the packed path: longest first by token count, each batch
    filled with up to ``batch_size * max_seq_length`` real tokens, the most a padded batch of
    ``batch_size`` could hold, so memory stays bounded as on the reference path.

    Unpadded linears cost the same per token whatever the batch, but bigger GEMMs and fewer calls run
    faster (BERT base, 2 shared cores: 4% with OMP_WAIT_POLICY=PASSIVE, 15% with the default policy),
    so short texts share bigger batches. Filling by real tokens also makes every full batch's token
    count land within one text of the budget: few distinct GEMM shapes (see ``Linear``).
    ``MINISBERT_TOKEN_BUDGET=0`` turns it off.
    """
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    if os.environ.get("MINISBERT_TOKEN_BUDGET", "1") == "0":  # plain batches of batch_size, for A/B runs
        return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    budget = batch_size * max_seq_length
    batches, current, tokens = [], [], 0
    for i in order:
        if current and tokens + len(ids[i]) > budget:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += len(ids[i])
    if current:
        batches.append(current)
    return batches


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


def native_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bf16 or fp16) GEMMs run natively on this CPU. oneDNN refuses them without AVX-512
    or AMX; with AVX-512 but without AVX512_BF16 or AMX-BF16 it runs bf16 emulated, several times slower
    than fp32."""
    if not mkldnn_usable(dtype):
        return False
    return dtype != torch.bfloat16 or cpu_kind().native_bf16 is not False


QUANTIZE = ("int8",)


def check_quantize(quantize: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """``quantize`` if this model can run it, else a ValueError saying why: int8 runs on the CPU, in float32."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE} (or None: exact float)")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"quantize={quantize!r} runs on the CPU with dtype=torch.float32 (weights and "
                         f"activations are quantized from fp32), not on {device} in {dtype}")
    return quantize


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


# int8 mode (opt-in, inexact): the block's linears on int8 weights and activations, as a backend of
# ``Linear``. The integer GEMM is exact (int32 sums); the error is the rounding of weights (one scale per
# output channel) and activations (one scale per token, so a text's rows never depend on its batch).
# A few input channels of BERT-like models hold outliers (LayerNorm outputs: 5-10x a token's RMS; GELU
# outputs too), and one outlier sets the whole token's scale. Turning each 64 columns of the input by a
# Hadamard rotation (and the weight's the same way, so x W^T is unchanged) spreads them over the block:
# all-MiniLM-L6-v2 on KorSTS, lowest cosine to fp32 0.987 plain, 0.9986 rotated (QuaRot's idea).
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


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, K) -> (rows, K) with zero rows appended (x itself when N == rows)."""
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


class Linear:
    """y = x W^T + b with the weight prepared once for the chosen backend; ``act`` is fused if it can be."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, act: str | None = None,
                 rotate_input: bool = False):
        self.backend = backend
        self.act = act
        self.bias = bias
        if backend == "mkldnn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        elif backend == "int8":
            # ``rotate_input``: each input turned by a block Hadamard rotation before it is quantized (see
            # ROTATION), the weight's columns the same way once here. Blocks of 64 columns, fewer if K needs.
            self.rotation = hadamard(math.gcd(weight.shape[1], ROTATION)) if rotate_input else None
            if self.rotation is not None:
                weight = rotate(weight, self.rotation)
            q, scale = quantize_rows(weight)  # (out, in) int8, (out, 1): one scale per output channel
            self.scale = scale.squeeze(1)  # (out,)
            self.onednn = onednn_int8_usable()
            # The rotation as oneDNN's prepacked fp32 GEMM on (N * K / 64, 64) rows where it runs: the same
            # values as ``x @ h`` here, and BERT base's int8 encode 6% faster (median of 5 interleaved passes).
            self.rotation_packed = torch.ops.mkldnn._reorder_linear_weight(self.rotation.t().contiguous()) \
                if self.rotation is not None and mkldnn_usable() else None
            if self.onednn:  # VNNI / AMX-INT8 kernels, weights pre-packed
                self.weight = torch.ops.onednn.qlinear_prepack(q, None)
                self.zero = torch.zeros_like(self.scale, dtype=torch.long)
            else:
                self.weight = q.t().contiguous()  # (in, out) for torch._int_mm
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        if self.backend in ("mkldnn", "int8"):
            # oneDNN keeps a primitive (JIT code and buffers) per input shape it has seen: one shape per
            # batch's token count grew the process by 2.4 GB over 100k texts. Row counts are multiples
            # of ROWS (the packed layout is padded once per forward, ``Packing(rows_multiple=...)``), which
            # bounds the shapes and keeps every GEMM above 1 row, the one count oneDNN rounds differently.
            run = self._int8 if self.backend == "int8" else self._onednn
            if N % self.ROWS:
                return run(pad_rows(x, -(-N // self.ROWS) * self.ROWS))[:N]
            return run(x)
        if N < 16:
            # MKL picks other kernels (other rounding) for a few rows: 1-3, 5-7 and 9-11 rows differ from
            # the same rows inside a larger GEMM on AMD Zen 3/4, 1-8 and 12-15 on an Intel Xeon with AMX.
            # Zero rows up to 16 keep a text's embedding the same whatever else shares its batch.
            return self(pad_rows(x, 16))[:N]
        y = F.linear(x, self.weight, self.bias)
        return ACTIVATIONS[self.act](y) if self.act else y

    ROWS = 32

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + (x W^T + b), for a layer without activation. oneDNN adds the residual in the GEMM's
        epilogue (a "sum" post-op: bitwise the same as the separate add, one pass over memory less)."""
        if self.backend == "mkldnn" and not self.act and x.shape[0] % self.ROWS == 0:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return self(x).add_(residual)

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


class PackedBlock:
    """One post-LN block (BERT's or DeBERTa-v2's) on packed tokens. Weights are the reference's tensors,
    except the fused q/k/v weight and bias, which are concatenated copies made here.

    Attention is the only step that needs a padded layout; ``attend(g, q, k, v)`` is the architecture's
    part for group ``g`` of the ``Packing``: each (b, H, T, D) in, (b, H, T, D) out.
    """

    def __init__(self, block: nn.Module, backend: str, hidden_act: str):
        attn = block.attn
        qkv_w = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3C, C)
        qkv_b = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])  # (3C,)
        self.n_head = attn.n_head
        # int8: the inputs with outlier channels (LayerNorm and activation outputs) are rotated; the
        # attention output feeding ``out`` has none (its quantization alone: cosine 0.99985 to fp32).
        self.qkv = Linear(qkv_w, qkv_b, backend, rotate_input=True)
        self.out = Linear(attn.out.weight, attn.out.bias, backend)
        # oneDNN fuses only exact GELU; other activations run after the GEMM.
        fuse = hidden_act == "gelu" and backend == "mkldnn"
        self.up = Linear(block.ffn.up.weight, block.ffn.up.bias, backend, act="gelu" if fuse else hidden_act,
                         rotate_input=True)
        self.down = Linear(block.ffn.down.weight, block.ffn.down.bias, backend, rotate_input=True)
        self.attn_ln, self.ffn_ln = block.attn_ln, block.ffn_ln

    def __call__(self, x: torch.Tensor, layout: "Packing", attend) -> torch.Tensor:
        N, C = x.shape
        H, D = self.n_head, C // self.n_head
        heads = []
        # One q/k/v GEMM over every group's tokens; attention per group, in its own padded length.
        for g, qkv in enumerate(layout.pad(self.qkv(x))):  # each (b, T, 3C)
            b, T, _ = qkv.shape
            q, k, v = qkv.view(b, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (b, H, T, D)
            heads.append(attend(g, q, k, v).transpose(1, 2).reshape(b, T, C))
        y = layout.unpad(heads)  # (rows, C): N real tokens, then filler rows
        x = self.attn_ln(self.out.add(y, x))  # post-LN, as the reference block: LN(x + out(y))
        step = self.FFN_ROWS if x.device.type == "cpu" else 0
        if not step or x.shape[0] <= step:
            return self.ffn_ln(self.down.add(self.up(x), x))
        # On the CPU the FFN runs on chunks of rows, so each chunk's (rows, 4C) intermediate is read back
        # by the down-projection from cache, not memory; the residual sum lands in place (add's out=).
        h = torch.empty_like(x)
        for s in range(0, x.shape[0], step):
            torch.add(x[s: s + step], self.down(self.up(x[s: s + step])), out=h[s: s + step])
        return self.ffn_ln(h)

    # Measured in-process (256 texts, 4 repetitions, bitwise the same embeddings): 1024 rows made BERT
    # base 4.5-7.7% faster and DeBERTa-v2 base 2.5%; 512 gave 3%, 768 and 2048 nothing. A multiple
    # of Linear.ROWS, so chunk and tail shapes stay few.
    FFN_ROWS = 1024


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, so the copy does not wait for the GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Packing:
    """Where the N real tokens of one or more right-padded batches ("groups", each (b, T) with its own
    T) sit in the packed (N, ...) layout: group after group, row after row, pads left out.

    ``pad`` gives each group back in its (b, T, ...) layout, ``unpad`` packs them. Groups let texts of
    different padded lengths share every linear layer's GEMM while each text's attention still runs at
    its own padded length (so its result cannot depend on its batch). A group without pads ("full": all
    its texts exactly T tokens, as passages cut at ``max_seq_length`` are) is a view of its rows in
    the packed layout, so ``pad`` copies nothing for it.
    """

    def __init__(self, masks: torch.Tensor | list[torch.Tensor], device: torch.device | str | None = None,
                 rows_multiple: int = 1):
        masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
        device = torch.device(device) if device is not None else masks[0].device
        # The indices are built on the host, where the masks come from (the tokenizer's lists), and sent
        # once: on CUDA, nonzero() and len() of a device tensor would each stall until the GPU is idle.
        masks = [m.cpu() for m in masks]
        self.shapes = [tuple(m.shape) for m in masks]
        flat = [m.bool().flatten() for m in masks]  # each (b * T,)
        self.full = [bool(f.all()) for f in flat]
        index = [f.nonzero().squeeze(1) for f in flat]  # each (n,): real positions in the group
        lengths = torch.cat([m.sum(dim=1) for m in masks])  # (B,) tokens per text, all groups
        # For ``pad``: the packed row each padded position reads. Pads read their group's first token, so
        # a gather builds the padded layout in one pass (no zero fill), and pads hold finite values. A full
        # group needs none: it is a view.
        source, self.offsets, offset = [], [], 0
        for f, i, full in zip(flat, index, self.full):
            s = None
            if not full:
                s = torch.full(f.shape, offset, dtype=torch.long)
                s[i] = torch.arange(offset, offset + len(i))
            source.append(s)
            self.offsets.append(offset)
            offset += len(i)
        self.n = offset  # N, real tokens
        # The packed layout has ``rows`` >= N rows: filler rows (copies of the last group's first token,
        # so finite) pad it to a multiple of ``rows_multiple``, which bounds the GEMM shapes.
        self.rows = -(-self.n // rows_multiple) * rows_multiple
        self.index = [to_device(i, device) for i in index]
        self.source = [None if s is None else to_device(s, device) for s in source]
        self.lengths = to_device(lengths, device)

    def unpad(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Per group (b, T, ...) -> (rows, ...): the N real tokens, then the filler rows."""
        x0 = xs[0]
        out = torch.empty((self.rows,) + tuple(x0.shape[2:]), dtype=x0.dtype, device=x0.device)
        for x, i, start, full in zip(xs, self.index, self.offsets, self.full):
            rows = out[start: start + len(i)]
            if full:
                rows.copy_(x.flatten(0, 1))
            else:
                torch.index_select(x.flatten(0, 1), 0, i, out=rows)
        if self.rows > self.n:  # filler rows: copies of the last group's first token (of row 0 if it is empty)
            out[self.n:] = out[self.offsets[-1] if self.offsets[-1] < self.n else 0]
        return out

    def pad(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N or rows, ...) -> per group (b, T, ...). A pad position holds a copy of its group's first token:
        attention masks it with the padding bias (any finite key gives exactly zero probability, as the
        reference's), and pooling masks it too. A full group is a view of ``x``, not a copy."""
        groups = []
        for source, (b, T), start, full in zip(self.source, self.shapes, self.offsets, self.full):
            rows = x[start: start + b * T] if full else x.index_select(0, source)  # (b * T, ...)
            groups.append(rows.view((b, T) + tuple(x.shape[1:])))
        return groups


Batch = list[tuple[torch.Tensor, torch.Tensor]]  # groups of (b, T) input_ids and attention_mask


class FastEncoder:
    """Packed-token forward of a reference model: ``__call__`` gives states, ``embed`` pooled vectors.

    Both take a list of groups, each a right-padded (b, T) ``input_ids`` and ``attention_mask``."""

    def __init__(self, model: nn.Module, backend: str | None = None, quantize: str | None = None):
        p = next(model.parameters())
        self.model = model
        self.device = p.device
        self.quantize = check_quantize(quantize, p.device, p.dtype)
        self.backend = "int8" if quantize else backend or default_linear_backend(p.device, p.dtype)
        if p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) and not native_half(p.dtype):
            log.warning("%s on this CPU has no native kernels (%s): expect it to be several times slower "
                        "than float32; for speed beyond float32 use quantize='int8' (inexact)", p.dtype,
                        cpu_kind().describe())
        self.blocks = [PackedBlock(b, self.backend, model.config.hidden_act) for b in model.blocks]
        if p.device.type == "cpu":
            raise_mmap_threshold()
        # oneDNN: every GEMM's row count a multiple of Linear.ROWS, padded once per forward.
        self.rows_multiple = Linear.ROWS if self.backend in ("mkldnn", "int8") else 1

    def layout(self, groups: Batch) -> Packing:
        return Packing([mask for _, mask in groups], self.device, self.rows_multiple)

    def __call__(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        """Groups of (b, T) ids and mask (on the host or the model's device) -> packed last hidden
        states (N, C) and their layout."""
        x, layout = self.forward(groups)  # (rows, C)
        return x[: layout.n], layout

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        """As ``__call__``, with the layout's filler rows still at the end: (rows, C)."""
        raise NotImplementedError

    def on_device(self, groups: Batch) -> Batch:
        return [(to_device(ids, self.device), to_device(mask, self.device)) for ids, mask in groups]

    def pool(self, groups: Batch, modes: tuple[str, ...]) -> torch.Tensor:
        """Groups of (b, T) ids and mask -> (sum of b, C * len(modes)) pooled embeddings, group after
        group, in the model's dtype."""
        x, layout = self(groups)  # (N, C)
        if modes == ("mean",):
            return kernels.packed_mean(x, layout.lengths)
        # Other modes are rare and cheap: pad back and use the reference pooling.
        return torch.cat([pool(states, mask, modes) for states, (_, mask) in zip(layout.pad(x), groups)])


class FastBert(FastEncoder):
    """``models.bert.BertModel`` and ``models.roberta.RobertaModel``."""

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        layout = self.layout(groups)
        groups = self.on_device(groups)
        # Positions from the reference function on each padded group (RoBERTa's depend on the ids).
        positions = layout.unpad([self.model.position_ids(ids) for ids, _ in groups])  # (rows,)
        x = self.model.embed(layout.unpad([ids for ids, _ in groups]), positions)  # (rows, C)
        # each (b, 1, 1, T); none for a group without pads (adding its zeros would change nothing)
        biases = [None if full else padding_bias(mask, x.dtype) for (_, mask), full in zip(groups, layout.full)]

        def attend(g, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=biases[g])  # (b, H, T, D)

        for block in self.blocks:
            x = block(x, layout, attend)
        return x, layout


class FastDebertaV2(FastEncoder):
    """``models.deberta_v2.DebertaV2Model``: the c2p/p2c terms and the padding become one additive
    bias for ``scaled_dot_product_attention``, whose own scale is DeBERTa's 1/sqrt(D * (1 + terms))."""

    # On the CPU, attention runs on chunks of texts whose (H, b*T, R) relative-score GEMM output stays
    # within a few MiB, so the pick of its scores reads them from cache instead of memory: 4.9% faster
    # for DeBERTa-v2 base in an in-process A/B (8.39 vs 8.80 s for 256 texts, 5 repetitions; 16-32 MiB
    # gained less), bitwise the same embeddings. On CUDA the whole group is one launch.
    CHUNK_BYTES = 8 << 20
    ROUND = 16  # relative-score GEMMs take a multiple of this many table rows

    def __init__(self, model: nn.Module, backend: str | None = None, quantize: str | None = None):
        super().__init__(model, backend, quantize)
        self._relative = {}  # T -> (RelativePositions on the model's device, whether they are a shift)
        self._positions: tuple[tuple, list] | None = None  # (parameter versions, per-block (pos_k, pos_q))

    def position_projections(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The model's per-block (pos_k, pos_q), (H, 2S, D) each: input-independent, so computed once
        and kept until a parameter they read changes (in place, or by a device or dtype move)."""
        model = self.model
        modules = [model.rel_embed, model.rel_ln, *(b.attn for b in model.blocks)]
        key = tuple((p.device, p.dtype, p.data_ptr(), p._version) for m in modules if m is not None
                    for p in m.parameters())
        if self._positions is None or self._positions[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # cached tensors must outlive inference mode
                self._positions = (key, model.position_projections())
        return self._positions[1]

    def forward(self, groups: Batch) -> tuple[torch.Tensor, Packing]:
        model, cfg = self.model, self.model.config
        layout = self.layout(groups)
        groups = self.on_device(groups)
        # The reference embedding on each padded group (cheap: a lookup and a LayerNorm), then packed.
        x = layout.unpad([model.embed(ids, mask) for ids, mask in groups])  # (rows, C)
        rel = []  # per group: relative-position buckets for its length, sent to the device once per length
        for ids, _ in groups:
            T = ids.shape[1]
            if T not in self._relative:
                if len(self._relative) >= 16:  # (T, T) int64 tables: bound the memory as the CPU cache does
                    self._relative.clear()
                with torch.inference_mode(False):  # usable outside inference mode too
                    rp = relative_positions(T, cfg.att_span, cfg.position_buckets, cfg.max_relative)
                    self._relative[T] = (RelativePositions(*(to_device(t, x.device) for t in rp[:3]), rp.rows),
                                         is_shift(rp))
            rel.append(self._relative[T])
        # Pad keys get the dtype's minimum, as the reference's masked_fill; pad query rows are dropped.
        pad_keys = [padding_bias(mask, x.dtype) for _, mask in groups]  # each (b, 1, 1, T)
        for block, ref, (pos_k, pos_q) in zip(self.blocks, model.blocks, self.position_projections()):
            # DeBERTa divides each relative term by the same scale; dividing the (H, 2S, D) position
            # tables once instead saves a pass over every (H, b, T, T) term.
            scale = ref.attn.scale
            pos_k = pos_k / scale if pos_k is not None else None
            pos_q = pos_q / scale if pos_q is not None else None
            # c2p reads the key table bottom up when the relative positions are a shift (see ``diagonals``).
            pos_k_rev = pos_k.flip(1) if pos_k is not None and any(shift for _, shift in rel) else None

            def heads(q, k, v, pad, rp, shift, cols, pos_k=pos_k, pos_k_rev=pos_k_rev, pos_q=pos_q, scale=scale):
                # Heads first: (H, b, T, D) views. Then the relative terms are one batched (b*T, D) @
                # (D, R) GEMM over the heads, and sdpa takes (H, b) as its batch dims; a (b, H, T, D) @
                # (H, D, R) broadcast would copy the position table once per text.
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
                H, b, T, D = q.shape
                bias = pad.view(1, b, 1, T)

                def pick(scores, index):  # (H, bT, ≥R) scores against the table -> (H, b, T, T) at index
                    if shift:
                        return diagonals(scores, b, T)  # a view
                    return scores.view(H, b, T, -1).gather(-1, index.expand(H, b, T, T))

                if pos_k is not None:  # c2p[i, j] = q_i . Kr[row(i - j)] / scale
                    if shift:  # the table's rows upside down, so that each row's keys run left to right
                        top = pos_k_rev.shape[1] - rp.rows.stop  # the reachable rows' last one, upside down
                        table = pos_k_rev[:, top: top + cols.stop - cols.start]
                    else:
                        table = pos_k[:, cols]
                    c2p = torch.matmul(q.reshape(H, b * T, D), table.transpose(-1, -2))  # (H, bT, ≥R)
                    bias = pick(c2p, rp.c2p) + bias  # (H, b, T, T)
                if pos_q is not None:  # p2c[i, j] = k_j . Qr[row(j - i)] / scale, transposed to (i, j)
                    p2c = torch.matmul(k.reshape(H, b * T, D), pos_q[:, cols].transpose(-1, -2))  # (H, bT, ≥R)
                    p2c = pick(p2c, rp.p2c).transpose(-1, -2)  # [j, i] -> [i, j]
                    bias = bias.add_(p2c) if pos_k is not None else p2c + bias
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / scale)  # (H, b, T, D)
                return out.transpose(0, 1)  # (b, H, T, D)

            def attend(g, q, k, v):
                b, H, T, _ = q.shape
                rp, shift = rel[g]
                # The relative-score GEMMs take the R = 2T - 1 reachable table rows and the next ones up
                # to a multiple of ROUND (never read; the table's end may cut them short): MKL's batched
                # GEMM with K = 64 runs 1.3-1.6x faster at such widths (T = 8-128, in isolation), 16%
                # less time in these GEMMs in place (256 texts), the same embeddings bit for bit.
                R = -(-(rp.rows.stop - rp.rows.start) // self.ROUND) * self.ROUND
                cols = slice(rp.rows.start, rp.rows.start + R)
                step = max(1, self.CHUNK_BYTES // (H * T * R * q.element_size())) if q.device.type == "cpu" else b
                if step >= b:
                    return heads(q, k, v, pad_keys[g], rp, shift, cols)
                return torch.cat([heads(q[s: s + step], k[s: s + step], v[s: s + step], pad_keys[g][s: s + step],
                                        rp, shift, cols) for s in range(0, b, step)])

            x = block(x, layout, attend)
        return x, layout


def is_shift(rp) -> bool:
    """Whether every (i, j) reads the table row of its plain distance: c2p[i, j] = i - j + T - 1 and
    p2c[j, i] the same, no two distances in one bucket, none clamped. DeBERTa's log buckets start
    beyond position_buckets / 2: this holds for T <= 132 with kf-deberta's 256 buckets, for any T up to
    the table's size without buckets."""
    T = rp.c2p.shape[0]
    d = torch.arange(T)
    plain = d[:, None] - d[None, :] + T - 1  # (T, T)
    return torch.equal(rp.c2p.cpu(), plain) and torch.equal(rp.p2c.cpu(), plain.T)


def diagonals(scores: torch.Tensor, b: int, T: int) -> torch.Tensor:
    """(H, b*T, W) scores of each row against consecutive table rows -> the (H, b, T, T) view whose
    [i, j] is row i's column T - 1 - i + j, with no copy (Transformer-XL's "relative shift").

    For plain distances each query row needs T consecutive columns, one column further left per row:
    with row stride W, element [i, j] sits at i * (W - 1) + j + T - 1, a strided view. c2p scores
    against the table upside down are such (row i = query i, its keys j left to right); p2c scores
    against the table as it is are such too with the roles swapped (row = key j, then transposed).
    """
    H, _, W = scores.shape
    assert scores.is_contiguous() and W >= 2 * T - 1
    return scores.as_strided((H, b, T, T), (b * T * W, T * W, W - 1, 1), scores.storage_offset() + T - 1)


def fast_forward(model: nn.Module, backend: str | None = None, quantize: str | None = None) -> FastEncoder | None:
    """The packed forward for ``model`` (a reference model from ``minisbert.models``), or None if unsupported;
    ``quantize="int8"``: its linears in int8 (inexact, opt-in)."""
    if isinstance(model, BertModel):
        return FastBert(model, backend, quantize)
    cfg = model.config
    if isinstance(model, DebertaV2Model) and not cfg.conv_kernel_size and cfg.attention_head_size * \
            cfg.num_attention_heads == cfg.hidden_size:
        # The convolution after block 0 (deberta-v2-xlarge) stays on the reference path.
        return FastDebertaV2(model, backend, quantize)
    return None


class PackedRunner:
    """The ``runner`` interface (see ``minisbert.runner``) over a packed forward.

    A batch's texts are grouped by ``padded_length``, each group padded to its own length, so each
    embedding is the same in any batch; every group's tokens share each linear layer's GEMM and
    attention runs group by group. Texts of exactly their padded length (passages cut at
    ``max_seq_length``) form groups of their own: without pads, their padded layout is a view of the
    packed tokens (``Packing``)."""

    def __init__(self, forward: FastEncoder, pad_id: int, modes: tuple[str, ...], max_tokens: int):
        self.forward, self.pad_id, self.modes, self.max_tokens = forward, pad_id, modes, max_tokens

    def batches(self, ids: list[list[int]], batch_size: int, max_seq_length: int) -> list[list[int]]:
        return token_batches(ids, batch_size, max_seq_length)

    def embed(self, ids: list[list[int]]) -> torch.Tensor:
        groups: dict[tuple[int, bool], list[int]] = {}
        for b, row in enumerate(ids):
            T = padded_length(len(row), self.max_tokens)
            groups.setdefault((T, len(row) == T), []).append(b)
        # Padded on the host: the packed layout is built there and sent once.
        padded = [pad_ids([ids[b] for b in rows], self.pad_id, T) for (T, _), rows in groups.items()]
        pooled = self.forward.pool(padded, self.modes)  # (B, C * modes), group after group
        order = to_device(torch.tensor([b for rows in groups.values() for b in rows]), pooled.device)
        return torch.empty_like(pooled).index_copy_(0, order, pooled)  # back to the order of ``ids``
