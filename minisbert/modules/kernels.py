"""Masked-mean pooling, sentence-transformers' mean, without materialising the (B, T, C) mask.

sentence-transformers multiplies the states by an expanded mask, sums and divides. Here the
mask-multiply-sum is one batched GEMV, ``mask (B, 1, T) @ x (B, T, C)``, accumulated in float32 for
half-precision inputs, and the count is clamped at 1e-9 exactly as sentence-transformers does (an
all-pad row gives zeros, not NaN). ``masked_mean`` pools padded states (the reference path's
``pooling.pool``); ``packed_mean_pool`` does the same on unpadded tokens (N, C) with one segment sum
(the fast path). On CUDA both are torch.compile'd into single kernels; on the CPU the eager forms are
already fused enough (one GEMM-like pass over x).

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
    mask = attention_mask.to(acc)  # (B, T)
    total = torch.bmm(mask.unsqueeze(1), x.to(acc)).squeeze(1)  # (B, 1, T) @ (B, T, C) -> (B, C)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1e-9)  # (B, 1)
    return (total / count).to(x.dtype)


def packed_mean_pool(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(N, C) packed tokens of B sequences with ``lengths`` (B,) summing to N -> (B, C) means."""
    acc = _acc_dtype(x.dtype)
    B = lengths.shape[0]
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
