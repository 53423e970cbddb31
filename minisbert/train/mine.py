"""Hard negatives mined with the model itself: sentence-transformers' ``util.mine_hard_negatives``
(without a cross-encoder, FAISS or the labeled output formats), on minisbert's embeddings.

    minisbert mine-hard-negatives --model M --data pairs.jsonl --output triplets.jsonl --num-negatives 3

For each distinct anchor: the corpus (the given texts plus every positive) ranked by cosine with the
anchor (normalized embeddings, ``encode_query`` / ``encode_document``), the anchor itself and its own
positives left out (``include_positives`` keeps the positives), candidates removed that score above
``max_score``, below ``min_score``, within ``absolute_margin`` (``margin``) of the anchor's weakest
positive or above ``positive - |positive| * relative_margin``; then ranks ``range_min .. range_max`` of
what remains, the first ``num_negatives`` (``top``) or that many drawn at random (``random``).
``triplet`` gives one (anchor, positive, negative) row per negative found; ``n-tuple`` one (anchor,
positive, negative_1 .. negative_n) row per pair that found all n. Defaults as sentence-transformers':
``range_max`` = range_min + num_negatives (x10 when a margin or max_score filters) + the most
positives any anchor has.
"""

from __future__ import annotations

import random as random_module

import torch

from minisbert.search import cos_sim


def mine_hard_negatives(encoder, anchors: list[str], positives: list[str], corpus: list[str] | None = None, *,
                        range_min: int = 0, range_max: int | None = None, max_score: float | None = None,
                        min_score: float | None = None, absolute_margin: float | None = None,
                        relative_margin: float | None = None, margin: float | None = None, num_negatives: int = 3,
                        sampling_strategy: str = "top", include_positives: bool = False,
                        output_format: str = "triplet", batch_size: int = 32, rng=None,
                        chunk_size: int = 16384) -> tuple[list[str], list[tuple[str, ...]]]:
    """(column names, rows) of the mined table; see the module docstring."""
    if not anchors or len(anchors) != len(positives):
        raise ValueError("mine_hard_negatives: as many anchors as positives, at least one")
    if sampling_strategy not in ("top", "random"):
        raise ValueError(f"sampling_strategy={sampling_strategy!r} is not top or random")
    if output_format not in ("triplet", "n-tuple"):
        raise ValueError(f"output_format={output_format!r} is not triplet or n-tuple")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    if margin is not None:  # sentence-transformers' older name
        absolute_margin = margin
    if include_positives:
        output_format = "n-tuple"  # as sentence-transformers: the ranking order is the point
    rng = rng or random_module

    queries = list(dict.fromkeys(anchors))
    query_idx = {q: i for i, q in enumerate(queries)}
    corpus = list(dict.fromkeys((positives if corpus is None else list(corpus)) + list(positives)))
    corpus_idx = {t: i for i, t in enumerate(corpus)}
    own_positives: list[list[int]] = [[] for _ in queries]  # each query's positives, in data order
    for a, p in zip(anchors, positives):
        if corpus_idx[p] not in own_positives[query_idx[a]]:
            own_positives[query_idx[a]].append(corpus_idx[p])
    self_idx = [corpus_idx.get(q, -1) for q in queries]  # the query's own text in the corpus
    if include_positives:
        for a, p in zip(anchors, positives):
            if a == p:
                self_idx[query_idx[a]] = -1
    most = max(len(p) for p in own_positives)
    if range_max is None:
        filtered = absolute_margin is not None or relative_margin is not None or max_score is not None
        range_max = range_min + num_negatives * (10 if filtered else 1) + most
    if not 0 <= range_min < range_max:
        raise ValueError(f"range_min={range_min} must be >= 0 and below range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise ValueError(f"cannot mine {num_negatives} negatives from ranks {range_min} to {range_max}")

    docs = encoder.encode_document(corpus, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True)
    q_emb = encoder.encode_query(queries, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True)
    docs, q_emb = docs.float().cpu(), q_emb.float().cpu()
    k = min(range_max + most + 1, len(corpus))  # enough candidates for what gets left out
    scores, indices = [], []
    for s in range(0, len(queries), chunk_size):
        top = torch.topk(cos_sim(q_emb[s: s + chunk_size], docs), k=k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
    scores, indices = torch.cat(scores), torch.cat(indices)  # (Q, k) each
    if k < range_max + most + 1:  # a small corpus: pad with candidates that never win
        pad = range_max + most + 1 - k
        scores = torch.cat([scores, scores.new_full((len(queries), pad), -torch.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((len(queries), pad), -1)], dim=1)

    # Per query-positive row, in query order: its positive's score.
    rows = [(qi, pi) for qi, ps in enumerate(own_positives) for pi in ps]
    positive_scores = (q_emb[[qi for qi, _ in rows]] * docs[[pi for _, pi in rows]]).sum(-1)
    weakest = torch.stack([positive_scores[[r for r, (qi, _) in enumerate(rows) if qi == q]].min()
                           for q in range(len(queries))])  # (Q,)

    scores[indices == -1] = -torch.inf
    scores[indices == torch.tensor(self_idx).unsqueeze(1)] = -torch.inf
    if not include_positives:
        for qi, ps in enumerate(own_positives):
            scores[qi, torch.isin(indices[qi], torch.tensor(ps))] = -torch.inf
    if absolute_margin is not None:
        scores[scores + absolute_margin > weakest.unsqueeze(1)] = -torch.inf
    if relative_margin is not None:
        scores[scores > (weakest - weakest.abs() * relative_margin).unsqueeze(1)] = -torch.inf
    if max_score is not None:
        scores[scores > max_score] = -torch.inf
    if min_score is not None:
        scores[(scores < min_score) & (scores != -torch.inf)] = -torch.inf

    negative_scores, local = torch.topk(scores, k=range_max, dim=1)
    chosen = indices.gather(1, local)[:, range_min:]
    negative_scores = negative_scores[:, range_min:]
    if sampling_strategy == "top":
        chosen, negative_scores = chosen[:, :num_negatives], negative_scores[:, :num_negatives]
    else:  # among the finite candidates (at least num_negatives), then best first
        options = (chosen.size(1) - negative_scores.isinf().sum(1)).clamp(min=num_negatives)
        picks = torch.tensor([rng.sample(range(n), k=num_negatives) for n in options.tolist()])
        chosen, negative_scores = chosen.gather(1, picks), negative_scores.gather(1, picks)
        negative_scores, order = negative_scores.sort(dim=1, descending=True)
        chosen = chosen.gather(1, order)

    if output_format == "triplet":
        names = ["anchor", "positive", "negative"]
        out = [(queries[qi], corpus[pi], corpus[n]) for qi, pi in rows
               for n, s in zip(chosen[qi].tolist(), negative_scores[qi].tolist()) if s != -torch.inf]
    else:
        names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, num_negatives + 1)]
        out = [(queries[qi], corpus[pi], *(corpus[n] for n in chosen[qi].tolist())) for qi, pi in rows
               if not negative_scores[qi].isinf().any()]
    return names, out
