"""bge-m3's two outputs beside the dense embedding: lexical weights and ColBERT vectors (M3-Embedding,
Chen et al., 2024), as FlagEmbedding's ``BGEM3FlagModel.encode`` computes them, and their two scores.

Both are small linears over the transformer's last hidden states, stored beside the sentence-transformers
files as ``torch.save`` pickles of an ``nn.Linear`` state dict (``weight``, ``bias``):

- ``sparse_linear.pt`` (C -> 1): a token's weight is ``relu(w . h + b)``; a text's lexical weights keep,
  per token id, the largest weight among its occurrences, leave out ids of weight 0 and the special
  tokens (cls, eos, pad, unk), and are keyed by the id as a string: ``{"2843": 0.21, ...}``.
- ``colbert_linear.pt`` (C -> C'): every token after the first (``<s>``; ``</s>`` is kept) through the
  linear, then L2-normalised: a (T - 1, C') array per text.

Scores, as FlagEmbedding's: lexical matching is the dot product of two weight dicts over their shared
ids; ColBERT's is late interaction, each query vector's best dot product with the passage's vectors,
averaged over the query's vectors.

Reference: FlagEmbedding 1.4, ``finetune/embedder/encoder_only/m3/modeling.py`` (``_sparse_embedding``,
``_colbert_embedding``, the inference ``forward``) and ``inference/embedder/encoder_only/m3.py``
(``_process_token_weights``, ``_process_colbert_vecs``, ``compute_lexical_matching_score``, ``colbert_score``).
Shapes: ``T`` tokens of one text, ``C`` hidden, ``C'`` ColBERT width.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SPARSE_FILE, COLBERT_FILE = "sparse_linear.pt", "colbert_linear.pt"
# Each file is one nn.Linear's own state dict: its names are ours (``io/weights.map_state_dict``'s table).
LINEAR_NAMES = types.SimpleNamespace(PREFIXES=(), IGNORED_KEYS=(),
                                     CHECKPOINT_NAMES={"weight": "weight", "bias": "bias"})


class M3Heads(nn.Module):
    """The two linears: ``sparse`` (C -> 1) and ``colbert`` (C -> C')."""

    def __init__(self, hidden_size: int, colbert_dim: int):
        super().__init__()
        self.sparse = nn.Linear(hidden_size, 1)
        self.colbert = nn.Linear(hidden_size, colbert_dim)


def token_weights(heads: M3Heads, states: torch.Tensor) -> torch.Tensor:
    """(..., T, C) last hidden states -> (..., T) lexical weight of each token, ReLU'd (>= 0)."""
    return torch.relu(heads.sparse(states)).squeeze(-1)


def lexical_weights(weights: list[float], ids: list[int], unused: frozenset[int]) -> dict[str, float]:
    """One text's token weights and ids -> {str(id): weight}: the largest weight per id, ids of weight 0
    and ``unused`` (the special tokens) left out, in the order the ids first carry a weight."""
    out: dict[str, float] = {}
    for w, i in zip(weights, ids):
        if i not in unused and w > 0 and w > out.get(str(i), 0.0):
            out[str(i)] = w
    return out


def colbert_vectors(heads: M3Heads, states: torch.Tensor) -> torch.Tensor:
    """(T, C) last hidden states of one text (its real tokens) -> (T - 1, C') normalised vectors of every
    token but the first. FlagEmbedding zeroes pads before normalising; a text's real tokens hold none."""
    return F.normalize(heads.colbert(states[1:]), dim=-1)


def lexical_matching_score(weights_1, weights_2):
    """Sum over shared ids of the two weights: one float for two dicts, a (n1, n2) array for two lists."""
    if isinstance(weights_1, dict) and isinstance(weights_2, dict):
        return sum(w * weights_2[i] for i, w in weights_1.items() if i in weights_2)
    if isinstance(weights_1, list) and isinstance(weights_2, list):
        return np.array([[lexical_matching_score(a, b) for b in weights_2] for a in weights_1])
    raise ValueError("lexical weights must be two dicts or two lists of dicts (encode_hybrid's lexical_weights)")


def colbert_score(query: np.ndarray, passage: np.ndarray) -> torch.Tensor:
    """Late interaction of one query's (Tq, C') and one passage's (Tp, C') ColBERT vectors: the mean over
    query vectors of their largest dot product with a passage vector (a 0-d tensor, as FlagEmbedding's)."""
    q, p = torch.as_tensor(query), torch.as_tensor(passage)
    return (q @ p.T).max(dim=-1).values.sum() / q.shape[0]  # (Tq, Tp) -> (Tq,) -> ()
