"""Gradient caching (GradCache; sentence-transformers' Cached* losses): a batch of thousands of examples
in the memory of a mini-batch, with the gradients of the whole batch.

An in-batch-negative loss needs every embedding of the batch at once, but not every activation:

1. embed each column in mini-batches of ``mini_batch_size`` without gradients (no activations kept),
   noting the random state before each (dropout);
2. the loss on those embeddings, as leaves: its backward gives d loss / d embedding, (B, D) per column;
3. each mini-batch embedded again, this time with gradients, from the same random state (the same
   dropout masks), and ``backward(d loss / d embedding)`` for its rows: the chain rule's second half,
   one mini-batch of activations alive at a time.

The parameters' gradients are the uncached loss's (the same sums, in mini-batch order), at the price of
a second forward. Peak memory: one mini-batch's activations plus B x D embeddings, whatever B is
(docs/training.md measures it).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def random_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_random_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(embed: Callable[[list[str]], torch.Tensor], columns: list[list[str]],
                    loss_of: Callable[[list[torch.Tensor]], torch.Tensor], mini_batch_size: int,
                    device: torch.device, grad_scale: float = 1.0,
                    autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """The loss of ``columns`` (K lists of B texts) with its gradients accumulated into the parameters
    that ``embed`` uses; returns the loss, detached (its backward is done). ``grad_scale``: a loss
    scaler's factor, applied to the embeddings' gradients (float16 AMP). ``autocast``: makes a fresh
    autocast context for each forward (None: float32)."""
    amp = autocast or contextlib.nullcontext
    chunks, states = [], []  # per column: its mini-batches' texts; their random states
    with torch.no_grad():
        cached = []
        for column in columns:
            parts = []
            for start in range(0, len(column), mini_batch_size):
                texts = column[start: start + mini_batch_size]
                states.append(random_state(device))
                with amp():
                    parts.append(embed(texts).detach())
                chunks.append(texts)
            cached.append(parts)
    after = random_state(device)
    leaves = [[p.requires_grad_() for p in parts] for parts in cached]
    with amp():
        loss = loss_of([torch.cat(parts) for parts in leaves])  # K x (B, D), as the uncached loss sees them
    (loss * grad_scale).backward()
    for texts, state, leaf in zip(chunks, states, (p for parts in leaves for p in parts)):
        set_random_state(state, device)  # the first pass's dropout masks again
        with amp():
            again = embed(texts)
        again.backward(leaf.grad.to(again.dtype))
    set_random_state(after, device)  # the stream goes on as after one pass
    return loss.detach()
