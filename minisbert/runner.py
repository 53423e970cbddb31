"""How token ids become pooled vectors: the small interface both forwards implement.

A runner has two methods, and ``SentenceEncoder`` calls nothing else of it:

- ``batches(ids, batch_size, max_seq_length)``: the texts (indices into ``ids``) that run together;
- ``embed(ids)``: one batch of token ids -> (B, C * modes) pooled vectors in the order of ``ids``,
  in the model's dtype, on its device.

``ReferenceRunner.embed`` also takes ``skip`` (pool without each text's first ``skip`` tokens: a
prompt with ``include_prompt: false``); the encoder runs the reference runner then.

``ReferenceRunner`` (here) runs the model files' own forward on padded batches and pools with
``pooling.pool``: the specification, and what runs when hooks are attached or ``fast=False``.
``fast/runner.py``'s ``PackedRunner`` runs the same math on the real tokens only.
``SentenceEncoder.runner`` is the one place that picks between them.

Both go through ``embed_padded``, as training does: each text is padded to its own token count
rounded up (``padded_length``), never to its batch's longest text, so a text's embedding cannot
depend on its neighbours: the fused attention kernel's sums are grouped by the padded length
(bert-base size: up to 4.8e-6 apart between batch sizes 1 and 64 when padding to the longest),
while rows of equal padded length compute the same bits in any batch.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from minisbert.modules.pooling import pool
from minisbert.text.tokenizer import pad_ids

_FORK_GUARD = []


def guard_forked_children() -> None:
    """Make a forked child run torch single-threaded (once per process; idempotent).

    GNU OpenMP's thread pool does not survive ``fork``: a child that enters a parallel region the
    parent had used (loading's casts, LayerNorm, oneDNN's weight reorder, any GEMM) waits forever for
    threads that were not copied. PyTorch's DataLoader avoids it the same way, with one thread in its
    workers. ``SentenceEncoder.from_pretrained`` calls this before it loads anything.
    """
    if not _FORK_GUARD and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_one_thread)
        _FORK_GUARD.append(True)


def _one_thread() -> None:
    torch.set_num_threads(1)


# A multiple of 8 also keeps every GEMM at >= 8 rows, where MKL uses one kernel (1-3, 5-7, 9-11 rows
# round differently).
PAD_MULTIPLE = 8


def padded_length(n_tokens: int, max_tokens: int) -> int:
    """The length a text of ``n_tokens`` tokens is padded to, whatever batch it is in: the next
    multiple of ``PAD_MULTIPLE``, but never past the position table (``max_tokens``)."""
    return min(-(-n_tokens // PAD_MULTIPLE) * PAD_MULTIPLE, max(n_tokens, max_tokens))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, so the copy does not wait for the GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


Padded = list[tuple[torch.Tensor, torch.Tensor]]  # groups of (b, T) input_ids and attention_mask, on the host


def embed_padded(ids: list[list[int]], pad_id: int, max_tokens: int, run, split_full: bool = False) -> torch.Tensor:
    """The one padded-embedding step: texts grouped by ``padded_length`` -> each group padded to that
    length -> ``run(groups)`` -> (B, W) rows back in the order of ``ids``.

    ``run`` takes the list of (b, T) ``input_ids``/``attention_mask`` groups (on the host) and returns
    their pooled vectors group after group, (sum of b, W), on any device. ``split_full``: texts of exactly
    their padded length form groups of their own (the packed path runs those without pads as views).
    The reordering is a gather, so gradients flow through it (training runs this too)."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for b, row in enumerate(ids):
        T = padded_length(len(row), max_tokens)
        groups.setdefault((T, split_full and len(row) == T), []).append(b)
    padded = [pad_ids([ids[b] for b in rows], pad_id, T) for (T, _), rows in groups.items()]
    pooled = run(padded)  # (B, W), group after group
    order = torch.tensor([b for rows in groups.values() for b in rows])
    return pooled.index_select(0, to_device(torch.argsort(order), pooled.device))  # back to the order of ``ids``


class ReferenceRunner:
    """The reference forward: texts padded in groups of equal ``padded_length``, one model call each."""

    def __init__(self, model: nn.Module, pad_id: int, modes: tuple[str, ...], max_tokens: int):
        self.model, self.pad_id, self.modes, self.max_tokens = model, pad_id, modes, max_tokens

    def batches(self, ids: list[list[int]], batch_size: int, max_seq_length: int) -> list[list[int]]:
        """``batch_size`` texts at a time, in the order given (``encode`` orders them longest first)."""
        return [list(range(s, min(s + batch_size, len(ids)))) for s in range(0, len(ids), batch_size)]

    def embed(self, ids: list[list[int]], skip: int = 0, compile: bool | None = None) -> torch.Tensor:
        """``compile``: as ``pooling.pool``'s (training passes False: no compiled kernel under autograd)."""
        device = next(self.model.parameters()).device

        def run(groups: Padded) -> torch.Tensor:
            pooled = []
            for input_ids, attention_mask in groups:
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                states = self.model(input_ids, attention_mask)  # (b, T, C)
                pooled.append(pool(states, attention_mask, self.modes, skip, compile))  # (b, C * modes)
            return torch.cat(pooled)

        return embed_padded(ids, self.pad_id, self.max_tokens, run)
