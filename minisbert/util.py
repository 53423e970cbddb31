"""``from minisbert import util``: the ``sentence_transformers.util`` functions minisbert has, under the
same names, so that code written against ``sentence_transformers.util`` runs unchanged. Each is the one
implementation in ``minisbert.search`` (similarities and search) or ``minisbert.quantize`` (quantized
embeddings), imported here, not copied.
"""

from minisbert.quantize import quantize_embeddings
from minisbert.search import (
    cos_sim,
    dot_score,
    euclidean_sim,
    manhattan_sim,
    pairwise_cos_sim,
    pairwise_dot_score,
    pairwise_euclidean_sim,
    pairwise_manhattan_sim,
    paraphrase_mining,
    paraphrase_mining_embeddings,
    semantic_search,
)
from minisbert.search import normalize as normalize_embeddings

pytorch_cos_sim = cos_sim  # sentence-transformers' older name for cos_sim

__all__ = ["cos_sim", "pytorch_cos_sim", "dot_score", "euclidean_sim", "manhattan_sim", "pairwise_cos_sim",
           "pairwise_dot_score", "pairwise_euclidean_sim", "pairwise_manhattan_sim", "semantic_search",
           "paraphrase_mining", "paraphrase_mining_embeddings", "quantize_embeddings", "normalize_embeddings"]
