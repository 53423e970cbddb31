"""glibc's malloc, primed once so the packed path's large tensors reuse heap memory.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("minisbert")


_HEAP_PRIMED = []
# glibc's ceiling for its dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
MMAP_THRESHOLD_MAX = 32 << 20


def primed() -> bool:
    """Whether this process has primed its heap (``raise_mmap_threshold``)."""
    return bool(_HEAP_PRIMED)


def raise_mmap_threshold() -> bool:
    """Free one block of just under 32 MiB, once per process, so malloc serves the fast path's tensors
    from its heap instead of fresh page-faulted mappings. ``MINISBERT_HEAP=0`` turns it off.

    glibc maps blocks above its mmap threshold (128 KiB at start) on their own and unmaps them on free;
    every new tensor that size is then zero-filled by the kernel one 4 KiB page fault at a time. glibc
    raises the threshold to the largest mapped block freed so far (at most 32 MiB) and returns heap
    memory above twice that. The packed forward's biggest tensors are a few GEMM outputs of 12-38 MB, so
    on its own the threshold settles low and the heap is trimmed and refilled every layer: BERT base,
    256 texts, 510k page faults and 1.2 s of system time per 8.1 s ``encode``; primed, ~0 faults and
    7.7 vs 8.3 s (medians of 4 alternating process pairs: ``python scripts/tune_fast.py --model
    random-bert --n 256 --heap``). Freeing one 32 MiB block sets the threshold
    to its maximum, as glibc does itself after any such free; nothing else changes (the threshold stays
    dynamic, no ``mallopt``). Elsewhere (musl, macOS) it is one allocation freed. Returns whether
    this call primed it (False: done before, or turned off).
    """
    if _HEAP_PRIMED or os.environ.get("MINISBERT_HEAP", "1") == "0":
        return False
    _HEAP_PRIMED.append(True)
    # Two at once: if the heap happens to hold a free block that large, the first one takes it and the
    # second is mapped. Under the ceiling with malloc's header; empty() leaves the pages untouched.
    blocks = [torch.empty(MMAP_THRESHOLD_MAX - (1 << 16), dtype=torch.uint8) for _ in range(2)]
    del blocks
    return True
