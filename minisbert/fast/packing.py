"""Where real tokens sit when pads are left out, and which texts share a batch.

``Packing`` maps right-padded groups to the packed (N, ...) layout and back; ``token_batches`` fills
batches to a token budget, longest first; host tensors reach the device through ``runner.to_device``.

Shape legend: B batch, T tokens (padded), N real tokens.
"""

from __future__ import annotations

import logging
import os

import torch

from minisbert.runner import to_device

log = logging.getLogger("minisbert")


def token_batches(ids: list[list[int]], batch_size: int, max_seq_length: int) -> list[list[int]]:
    """Indices of the texts in batches for the packed path: longest first by token count, each batch
    filled with up to ``batch_size * max_seq_length`` real tokens, the most a padded batch of
    ``batch_size`` could hold, so memory stays bounded as on the reference path.

    Unpadded linears cost the same per token whatever the batch, but bigger GEMMs and fewer calls run
    faster (BERT base, 2 shared cores: 4% with OMP_WAIT_POLICY=PASSIVE, 15% with the default policy;
    ``python scripts/tune_fast.py --model random-bert --n 512 --token-budget``), so short texts share
    bigger batches. Filling by real tokens also makes every full batch's token
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
