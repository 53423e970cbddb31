"""Similarity functions and the search helpers built on them, as sentence-transformers' ``util`` has
them (the same torch operations in the same order, so the scores and the rankings are equal), for
dense embeddings from ``SentenceEncoder.encode``: arrays, tensors, or lists of vectors.

- ``cos_sim``, ``dot_score``, ``euclidean_sim``, ``manhattan_sim``: (len(a), len(b)) score matrices
  (the distances negated, so that higher is always more similar); ``pairwise_*``: the score of each
  pair ``a[i], b[i]``. ``SIMILARITY`` / ``PAIRWISE`` map ``similarity_fn_name`` to them.
- ``semantic_search(queries, corpus, top_k=10)``: each query's ``top_k`` corpus entries, as
  ``[{"corpus_id": int, "score": float}, ...]`` best first, scanning the corpus in chunks.
- ``paraphrase_mining(encoder, sentences)`` / ``paraphrase_mining_embeddings(embeddings)``: the most
  similar pairs among the texts themselves, as ``[score, i, j]`` with ``i < j``, best first.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from itertools import islice
from operator import itemgetter

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def from_numpy(a: np.ndarray) -> Tensor:
    """A view of a writable array (a corpus of embeddings is not copied); a copy of a read-only one
    (a memmap) or of a dtype torch lacks."""
    if a.flags.writeable:
        try:
            return torch.from_numpy(a)
        except TypeError:
            pass
    return torch.tensor(a)


def as_tensor(a) -> Tensor:
    """A tensor of ``a``: numpy arrays viewed, lists of vectors stacked. Results are always written to
    fresh tensors, never into ``a``."""
    if isinstance(a, list):
        if a and all(isinstance(x, Tensor) for x in a):
            return torch.stack(a)
        if a and all(isinstance(x, np.ndarray) for x in a):
            return torch.stack([from_numpy(x) for x in a])
        return torch.tensor(a)
    if isinstance(a, np.ndarray):
        return from_numpy(a)
    return a if isinstance(a, Tensor) else torch.tensor(a)


def as_float(a) -> Tensor:
    """``as_tensor``, with half precision widened to float32: a matmul in fp16/bf16 would round nearby
    scores into ties."""
    a = as_tensor(a)
    if torch.is_floating_point(a) and torch.finfo(a.dtype).bits < 32:
        a = a.to(torch.float32)
    return a


def as_batch(a) -> Tensor:
    """``as_float`` as a (N, D) batch: a single vector is a batch of one."""
    a = as_float(a)
    return a.unsqueeze(0) if a.dim() == 1 else a


def normalize(a: Tensor) -> Tensor:
    return F.normalize(a, p=2, dim=-1)


def cos_sim(a, b) -> Tensor:
    a, b = as_batch(a), as_batch(b)
    return torch.mm(normalize(a), normalize(b).transpose(0, 1))


def dot_score(a, b) -> Tensor:
    a, b = as_batch(a), as_batch(b)
    return torch.mm(a, b.transpose(0, 1))


def euclidean_sim(a, b) -> Tensor:
    return -torch.cdist(as_batch(a), as_batch(b), p=2.0)


def manhattan_sim(a, b) -> Tensor:
    return -torch.cdist(as_batch(a), as_batch(b), p=1.0)


def pairwise_dot_score(a, b) -> Tensor:
    return (as_float(a) * as_float(b)).sum(dim=-1)


def pairwise_cos_sim(a, b) -> Tensor:
    return pairwise_dot_score(normalize(as_float(a)), normalize(as_float(b)))


def pairwise_euclidean_sim(a, b) -> Tensor:
    return -torch.linalg.vector_norm(as_float(a) - as_float(b), dim=-1)


def pairwise_manhattan_sim(a, b) -> Tensor:
    return -torch.sum(torch.abs(as_float(a) - as_float(b)), dim=-1)


SIMILARITY = {"cosine": cos_sim, "dot": dot_score, "euclidean": euclidean_sim, "manhattan": manhattan_sim}
PAIRWISE = {"cosine": pairwise_cos_sim, "dot": pairwise_dot_score, "euclidean": pairwise_euclidean_sim,
            "manhattan": pairwise_manhattan_sim}


def semantic_search(query_embeddings, corpus_embeddings, query_chunk_size: int = 100,
                    corpus_chunk_size: int = 500000, top_k: int = 10,
                    score_function: Callable[[Tensor, Tensor], Tensor] = cos_sim) -> list[list[dict]]:
    """For each query, the ``top_k`` most similar corpus entries, best first:
    ``[[{"corpus_id": int, "score": float}, ...], ...]``. The corpus is scanned ``corpus_chunk_size``
    entries at a time against ``query_chunk_size`` queries at a time (memory bounded by their product)."""
    queries, corpus = as_tensor(query_embeddings), as_tensor(corpus_embeddings)
    if queries.dim() == 1:
        queries = queries.unsqueeze(0)
    if corpus.device != queries.device:
        queries = queries.to(corpus.device)
    results = [[] for _ in range(len(queries))]  # per query: a min-heap of (score, corpus_id)
    # Cosine = dot product of unit vectors: each corpus chunk is normalised once, not once per query chunk.
    normalize_chunks = score_function is cos_sim
    for c_start in range(0, len(corpus), corpus_chunk_size):
        chunk = corpus[c_start: c_start + corpus_chunk_size]
        if normalize_chunks:
            chunk = normalize(as_batch(chunk))
        for q_start in range(0, len(queries), query_chunk_size):
            q_chunk = queries[q_start: q_start + query_chunk_size]
            if normalize_chunks:
                scores = dot_score(normalize(as_batch(q_chunk)), chunk)
            else:
                scores = score_function(q_chunk, chunk)
            values, idx = torch.topk(scores, min(top_k, len(scores[0])), dim=1, largest=True, sorted=False)
            values, idx = values.cpu().tolist(), (idx + c_start).cpu().tolist()
            for heap, ids, vals in zip(results[q_start: q_start + query_chunk_size], idx, values):
                candidates = zip(vals, ids)
                for candidate in islice(candidates, top_k - len(heap)):  # fill up to top_k
                    heapq.heappush(heap, candidate)
                for candidate in candidates:  # then keep a candidate only if it beats the minimum
                    heapq.heappushpop(heap, candidate)
    return [[{"corpus_id": corpus_id, "score": score}
             for score, corpus_id in sorted(heap, key=itemgetter(0), reverse=True)] for heap in results]


def paraphrase_mining(encoder, sentences: list[str], show_progress_bar: bool = False, batch_size: int = 32,
                      query_chunk_size: int = 5000, corpus_chunk_size: int = 100000, max_pairs: int = 500000,
                      top_k: int = 100, score_function: Callable[[Tensor, Tensor], Tensor] = cos_sim,
                      truncate_dim: int | None = None, prompt_name: str | None = None,
                      prompt: str | None = None) -> list[list]:
    """The most similar pairs among ``sentences``, embedded by ``encoder``: ``[[score, i, j], ...]``."""
    embeddings = encoder.encode(sentences, show_progress_bar=show_progress_bar, batch_size=batch_size,
                                convert_to_tensor=True, truncate_dim=truncate_dim, prompt_name=prompt_name,
                                prompt=prompt)
    return paraphrase_mining_embeddings(embeddings, query_chunk_size=query_chunk_size,
                                        corpus_chunk_size=corpus_chunk_size, max_pairs=max_pairs, top_k=top_k,
                                        score_function=score_function)


def paraphrase_mining_embeddings(embeddings, query_chunk_size: int = 5000, corpus_chunk_size: int = 100000,
                                 max_pairs: int = 500000, top_k: int = 100,
                                 score_function: Callable[[Tensor, Tensor], Tensor] = cos_sim) -> list[list]:
    """The ``max_pairs`` most similar pairs ``[score, i, j]`` (``i < j``, best first), each text compared
    with its ``top_k`` nearest others. ``score_function`` must be symmetric: one direction is kept."""
    embeddings = as_tensor(embeddings)
    pairs = []  # min-heap of (score, i, j), at most max_pairs
    queued = set()  # the (i, j) in ``pairs``
    min_score = float("-inf")
    for q_start in range(0, len(embeddings), query_chunk_size):
        queries = embeddings[q_start: q_start + query_chunk_size]
        # Each query's top_k + 1 (itself included) over all corpus chunks, whatever the chunk size.
        top_values, top_idx = None, None
        for c_start in range(0, len(embeddings), corpus_chunk_size):
            scores = score_function(queries, embeddings[c_start: c_start + corpus_chunk_size]).detach()
            values, idx = torch.topk(scores, min(top_k + 1, len(scores[0])), dim=1, largest=True)
            idx = idx + c_start
            if top_values is None:
                top_values, top_idx = values, idx
            else:
                values, idx = torch.cat([top_values, values], dim=1), torch.cat([top_idx, idx], dim=1)
                top_values, pos = torch.topk(values, min(top_k + 1, len(values[0])), dim=1)
                top_idx = torch.gather(idx, 1, pos)
        top_values, top_idx = top_values.cpu().tolist(), top_idx.cpu().tolist()
        for q in range(len(top_values)):
            i = q_start + q
            neighbours = [(j, s) for j, s in zip(top_idx[q], top_values[q]) if i != j][:top_k]
            for j, score in neighbours:
                if score <= min_score:
                    continue
                pair = (i, j) if i < j else (j, i)
                if pair in queued:
                    continue
                queued.add(pair)
                if len(pairs) < max_pairs:
                    heapq.heappush(pairs, (score, *pair))
                else:
                    evicted = heapq.heappushpop(pairs, (score, *pair))
                    queued.discard(evicted[1:])
                    min_score = evicted[0]
    return sorted(([score, i, j] for score, i, j in pairs), key=lambda x: x[0], reverse=True)
