"""Masked-mean pooling, sentence-transformers' mean.

sentence-transformers multiplies the states by an expanded mask, sums over the tokens and divides;
the count is clamped at 1e-9 exactly as it does (an all-pad row gives zeros, not NaN), and half-precision
inputs are accumulated in float32. ``masked_mean`` pools padded states (the reference path's
``pooling.pool``) with sentence-transformers' own formula; ``packed_mean_pool`` pools unpadded tokens
(N, C) (the fast path) by summing each text's contiguous rows, the same reduction over the same values,
so both give sentence-transformers' sums bit for bit on the CPU. The order of a sum matters at long
texts: a GEMV (``mask @ x``) or a running ``index_add_`` over 2,048 tokens drifted 5e-5 from it on a
tiny ModernBERT, the cascaded ``sum`` 1e-7. On CUDA ``packed_mean`` is torch.compile'd into a single
segment-sum kernel.

Shape legend: B batch, T tokens, N real tokens in the batch, C hidden.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("minisbert")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def masked_mean(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) 1/0 -> (B, C) mean of the real tokens' states, in x's dtype."""
    acc = _acc_dtype(x.dtype)
    mask = attention_mask.to(acc).unsqueeze(-1)  # (B, T, 1)
    total = (x.to(acc) * mask).sum(dim=1)  # (B, C)
    count = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return (total / count).to(x.dtype)


def packed_mean_pool(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, C) packed tokens of B sequences with ``lengths`` (B,) summing to N -> (B, C) means."""
    acc = _acc_dtype(x.dtype)
    B = lengths.shape[0]
    if x.device.type == "cpu" and not torch.compiler.is_compiling():  # each text's rows: a view, summed as ST does
        rows = torch.split(x[: int(lengths.sum())], lengths.tolist())
        total = torch.stack([r.to(acc).sum(dim=0) for r in rows]) if B else x.new_zeros((0, x.shape[1]), dtype=acc)
        return (total / lengths.to(acc).unsqueeze(1).clamp(min=1e-9)).to(x.dtype)
    # output_size keeps the shape static for torch.compile (no data-dependent size, no device sync).
    segment = torch.repeat_interleave(torch.arange(B, device=x.device), lengths, output_size=x.shape[0])  # (N,)
    total = torch.zeros((B, x.shape[1]), dtype=acc, device=x.device).index_add_(0, segment, x.to(acc))
    count = lengths.to(acc).unsqueeze(1).clamp(min=1e-9)  # (B, 1)
    return (total / count).to(x.dtype)


@functools.cache
def compiled(fn):
    """``fn`` through torch.compile (inductor), once per function; shapes vary, so dynamic."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


_COMPILE_FAILED: set = set()


def compile_failures() -> list[str]:
    """The kernels whose torch.compile failed in this process (they run eagerly since): none, normally."""
    return sorted(fn.__name__ for fn in _COMPILE_FAILED)


def _maybe_compiled(fn, compile: bool, *args: torch.Tensor) -> torch.Tensor:
    if compile and fn not in _COMPILE_FAILED:
        try:
            # Every size unbacked: one graph per dtype serves all shapes, sizes 0 and 1 included (dynamic
            # shapes alone specialise 1, and the recompiles ran into dynamo's limit of 8 on CUDA).
            for t in args:
                for dim in range(t.dim()):
                    torch._dynamo.decorators.mark_unbacked(t, dim)
            return compiled(fn)(*args)
        except Exception as e:  # noqa: BLE001 - no working compiler (e.g. no C++ toolchain): stay correct
            _COMPILE_FAILED.add(fn)  # do not pay for a failing compile on every batch
            log.warning("torch.compile of %s failed, using the eager kernel (%s)", fn.__name__, e)
    return fn(*args)


def mean_pool(x: torch.Tensor, attention_mask: torch.Tensor, compile: bool | None = None) -> torch.Tensor:
    """``masked_mean``, compiled when ``compile`` (default: on CUDA); eager if compiling fails."""
    return _maybe_compiled(masked_mean, x.is_cuda if compile is None else compile, x, attention_mask)


def packed_mean(x: torch.Tensor, lengths: torch.Tensor, compile: bool | None = None) -> torch.Tensor:
    """``packed_mean_pool``, compiled when ``compile`` (default: on CUDA); eager if compiling fails."""
    return _maybe_compiled(packed_mean_pool, x.is_cuda if compile is None else compile, x, lengths)
