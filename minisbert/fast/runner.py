"""The ``runner`` interface (``minisbert/runner.py``) over the packed forward, and its choice.

``fast_forward(model)`` gives the packed forward for a reference model (or None); ``PackedRunner``
batches by ``token_batches`` (longest first by token count, filled to a token budget) and groups a
batch's texts by padded length and fullness.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from minisbert.fast.deberta_v2 import FastDebertaV2
from minisbert.fast.modernbert import FastModernBert
from minisbert.fast.packed import FastBert, FastEncoder
from minisbert.fast.packing import token_batches
from minisbert.models.bert import BertModel
from minisbert.models.deberta_v2 import DebertaV2Model
from minisbert.models.modernbert import ModernBertModel
from minisbert.runner import embed_padded

log = logging.getLogger("minisbert")


def fast_forward(model: nn.Module, backend: str | None = None, quantize: str | None = None,
                 **options) -> FastEncoder | None:
    """The packed forward for ``model`` (a reference model from ``minisbert.models``), or None if unsupported;
    ``quantize="int8"``: its linears in int8 (inexact, opt-in). ``options``: the tuned settings, for tests
    and ``scripts/tune_fast.py`` (``FastEncoder``'s keywords; DeBERTa-v2's too for its models)."""
    if isinstance(model, BertModel):
        return FastBert(model, backend, quantize, **options)
    if isinstance(model, ModernBertModel):
        return FastModernBert(model, backend, quantize, **options)
    cfg = model.config
    if isinstance(model, DebertaV2Model) and not cfg.conv_kernel_size and cfg.attention_head_size * \
            cfg.num_attention_heads == cfg.hidden_size:
        # The convolution after block 0 (deberta-v2-xlarge) stays on the reference path.
        return FastDebertaV2(model, backend, quantize, **options)
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
        # Padded on the host: the packed layout is built there and sent once.
        return embed_padded(ids, self.pad_id, self.max_tokens, lambda groups: self.forward.pool(groups, self.modes),
                            split_full=True)
