"""``SentenceEncoder.encode_hybrid``: bge-m3's dense, lexical and ColBERT outputs from one forward, as
FlagEmbedding's ``BGEM3FlagModel.encode(return_dense, return_sparse, return_colbert_vecs)`` returns them.

One forward gives every text's last hidden states; the dense embedding is the encoder's own (its Pooling
and head: CLS + Normalize for bge-m3, what ``encode`` returns), the other two come from the heads in
``modules/bge_m3.py``, loaded from the folder at the first call. The forward is the encoder's runner's:
the packed fast path (``FastEncoder`` returns the packed (N, C) states and their layout, padded back
per group here) or the reference model on padded groups; texts are grouped by ``padded_length`` as
``encode`` groups them, so a text's outputs do not depend on the texts beside it.
"""

from __future__ import annotations

import numpy as np
import torch

from minisbert.fast.runner import PackedRunner
from minisbert.loading import load_m3_heads
from minisbert.modules import bge_m3
from minisbert.modules.pooling import pool
from minisbert.runner import padded_length
from minisbert.text.tokenizer import check_texts, pad_ids, token_str

# The tokens whose lexical weight FlagEmbedding drops (the tokenizer's cls, eos, pad and unk tokens),
# with XLMRobertaTokenizer's defaults.
UNUSED_TOKENS = {"cls_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def m3_heads(encoder) -> bge_m3.M3Heads:
    """The encoder's bge-m3 heads on its model's device and dtype, read once from its folder."""
    if "_m3_heads" not in encoder.__dict__:
        encoder._m3_heads = load_m3_heads(encoder.folder, encoder.model.config.hidden_size)
    if encoder._m3_heads is None:
        raise ValueError(f"{encoder.folder.root}: no {bge_m3.SPARSE_FILE} / {bge_m3.COLBERT_FILE} (bge-m3's lexical "
                         f"and ColBERT heads): return_sparse and return_colbert_vecs need a bge-m3 folder")
    p = next(encoder.model.parameters())
    return encoder._m3_heads.to(device=p.device, dtype=p.dtype)


def unused_ids(encoder) -> frozenset[int]:
    config = {**encoder.folder.tokenizer.config, **encoder.folder.tokenizer.special_tokens_map}
    names = [token_str(config.get(k), d) for k, d in UNUSED_TOKENS.items()]
    ids = [encoder.tokenizer.tokenizer.token_to_id(t) for t in names]
    return frozenset(i for i in ids if i is not None)


def padded_states(encoder, ids: list[list[int]]):
    """Each group of ``ids`` (texts of one ``padded_length``) as (rows, states (b, T, C), mask (b, T)):
    the last hidden states from the encoder's runner, pads' states arbitrary (masked)."""
    groups: dict[int, list[int]] = {}
    for b, row in enumerate(ids):
        groups.setdefault(padded_length(len(row), encoder.max_tokens), []).append(b)
    padded = [pad_ids([ids[b] for b in rows], encoder.tokenizer.pad_id, T) for T, rows in groups.items()]
    runner = encoder.runner
    if isinstance(runner, PackedRunner):
        x, layout = runner.forward(padded)  # (N, C) packed, group after group
        states = layout.pad(x)  # each (b, T, C)
    else:
        device = next(encoder.model.parameters()).device
        states = [encoder.model(i.to(device), m.to(device)) for i, m in padded]  # each (b, T, C)
    return [(rows, s, m.to(s.device)) for rows, s, (_, m) in zip(groups.values(), states, padded)]


@torch.inference_mode()
def encode_hybrid(encoder, sentences, batch_size: int = 32, max_length: int | None = None,
                  return_dense: bool = True, return_sparse: bool = True, return_colbert_vecs: bool = True) -> dict:
    """{"dense_vecs": (N, D) float32 array, "lexical_weights": [{str(id): weight}], "colbert_vecs":
    [(T_i - 1, C') float32 arrays]}, each None where not asked for; one text (a str): unbatched."""
    if not (return_dense or return_sparse or return_colbert_vecs):
        raise ValueError("choose one or more of return_dense, return_sparse and return_colbert_vecs")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    single = isinstance(sentences, str)
    texts = check_texts([sentences] if single else sentences)
    heads = m3_heads(encoder) if return_sparse or return_colbert_vecs else None
    unused = unused_ids(encoder) if return_sparse else frozenset()
    saved = encoder.max_seq_length
    try:
        if max_length is not None:
            encoder.max_seq_length = max_length  # checked against the position table there
        ids = encoder.tokenizer.encode_ids(texts)
        cut = encoder.max_seq_length
    finally:
        encoder.max_seq_length = saved
    order = sorted(range(len(ids)), key=lambda b: -len(ids[b]))  # longest first, as encode batches
    dense: list = [None] * len(ids)
    lexical: list = [None] * len(ids)
    colbert: list = [None] * len(ids)
    for batch in encoder.runner.batches([ids[b] for b in order], batch_size, cut):
        texts_ids = [ids[order[k]] for k in batch]
        for rows, states, mask in padded_states(encoder, texts_ids):
            if return_dense:
                emb = encoder.head(pool(states, mask, encoder.pooling.modes))  # (b, D)
                for j, k in enumerate(rows):
                    dense[order[batch[k]]] = emb[j].float().cpu().numpy()
            weights = token_weights_list(heads, states) if return_sparse else None
            for j, k in enumerate(rows):
                b, n = order[batch[k]], len(texts_ids[k])
                if return_sparse:
                    lexical[b] = bge_m3.lexical_weights(weights[j][:n], texts_ids[k], unused)
                if return_colbert_vecs:
                    colbert[b] = bge_m3.colbert_vectors(heads, states[j, :n]).float().cpu().numpy()
    stacked = np.stack(dense) if dense else np.empty((0, encoder.embedding_dim), np.float32)
    out = {"dense_vecs": stacked if return_dense else None,
           "lexical_weights": lexical if return_sparse else None,
           "colbert_vecs": colbert if return_colbert_vecs else None}
    return {k: v[0] if single and v is not None else v for k, v in out.items()}


def token_weights_list(heads: bge_m3.M3Heads, states: torch.Tensor) -> list[list[float]]:
    """(b, T, C) states -> each row's T token weights as floats (float32 values, as FlagEmbedding's)."""
    return bge_m3.token_weights(heads, states).float().cpu().tolist()
