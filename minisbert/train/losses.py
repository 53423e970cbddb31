"""Training losses over sentence embeddings, equal to sentence-transformers' (6.3, and the legacy 2.x that
trained the seed models).

A loss is a small function ``loss(embeddings, labels, **params) -> scalar``: ``embeddings`` holds one
(B, D) tensor per text column of the batch (anchor, positive, negatives... or sentence1, sentence2),
``labels`` the (B,) float32 scores of a scored-pairs batch, or None. ``LOSSES`` maps the names the
model cards print to the function and what data it takes; another loss is one more function and row.

Three keys a recipe's ``loss_params`` may hold are not arguments of the function: ``mini_batch_size``
(a Cached loss: the loop embeds with gradient caching, ``cached.py``), ``guide`` (GIST: a model the loop
loads and whose embeddings arrive as ``guide_embeddings``) and, for ``MatryoshkaLoss``, the inner
``loss``, resolved here into its own (Loss, params). ``gather_across_devices`` gathers the candidates
of every rank (``distributed.gather``): rank r's rows sit at r*B..r*B+B-1 of each gathered column, so
anchor i's positive is candidate r*B + i, the hard negatives following all ranks' positives, exactly
the layout of one process's batch of (ranks x B) examples.

Shape legend: B batch (examples), D embedding width, W ranks, K candidate columns (positive + hard negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minisbert.checks import unknown_keys
from minisbert.search import cos_sim, dot_score, normalize, pairwise_cos_sim  # as sentence_transformers.util's
from minisbert.train.distributed import gather

SIMILARITIES = {"cos_sim": cos_sim, "dot_score": dot_score}


def gathered(columns: list[torch.Tensor], on: bool) -> tuple[list[torch.Tensor], int]:
    """Each column gathered over the ranks when ``on`` (with gradients), and this rank's row offset."""
    if not on:
        return columns, 0
    out = [gather(c) for c in columns]
    return [c for c, _ in out], out[0][1]


def multiple_negatives_ranking_loss(embeddings: list[torch.Tensor], labels: torch.Tensor | None = None,
                                    scale: float = 20.0, similarity_fct: str = "cos_sim",
                                    gather_across_devices: bool = False) -> torch.Tensor:
    """InfoNCE with in-batch negatives (``MultipleNegativesRankingLoss``).

    Anchor i must pick its own positive among every candidate of the batch: all B positives and, for
    triplets, all B hard negatives, so each row is a (B * K)-way classification whose answer is column i.
    Written as the legacy loss was, ``cross_entropy(scale * sim, arange(B))``; sentence-transformers 6.2
    computes the same ``-(s_ii - logsumexp_j s_ij)`` mean with the terms in another order.
    """
    anchors = embeddings[0]  # (B, D)
    columns, offset = gathered(embeddings[1:], gather_across_devices)  # K x (W * B, D)
    scores = SIMILARITIES[similarity_fct](anchors, torch.cat(columns)) * scale  # (B, W * B * K)
    target = torch.arange(offset, offset + len(anchors), device=scores.device)  # anchor i's positive
    return F.cross_entropy(scores, target)


def multiple_negatives_symmetric_ranking_loss(embeddings: list[torch.Tensor], labels: torch.Tensor | None = None,
                                              scale: float = 20.0, similarity_fct: str = "cos_sim",
                                              gather_across_devices: bool = False) -> torch.Tensor:
    """MNR's anchor -> candidates term averaged with its mirror, positive i -> every anchor
    (``MultipleNegativesSymmetricRankingLoss``: sentence-transformers 6.3's MNR with directions
    query_to_doc + doc_to_query, one softmax per direction)."""
    anchors, positives = embeddings[0], embeddings[1]  # (B, D) each
    (all_anchors, *columns), offset = gathered(embeddings, gather_across_devices)
    sim = SIMILARITIES[similarity_fct]
    forward = sim(anchors, torch.cat(columns)) * scale  # (B, W * B * K)
    backward = sim(all_anchors, positives).T * scale  # (B, W * B): positive i against every anchor
    target = torch.arange(offset, offset + len(anchors), device=forward.device)
    return (F.cross_entropy(forward, target) + F.cross_entropy(backward, target)) / 2


def gist_embed_loss(embeddings: list[torch.Tensor], labels: torch.Tensor | None = None, *,
                    guide_embeddings: list[torch.Tensor], temperature: float = 0.01,
                    margin_strategy: str = "absolute", margin: float = 0.0, contrast_anchors: bool = True,
                    contrast_positives: bool = True, gather_across_devices: bool = False) -> torch.Tensor:
    """MNR at ``1 / temperature`` whose in-batch negatives the guide model filters (``GISTEmbedLoss``):
    a candidate the guide finds more similar to anchor i than i's own positive (less the margin:
    absolute ``g_ii - margin``, relative ``g_ii - |g_ii| * margin``) is a likely false negative and
    leaves the softmax. Candidates: positives, other anchors, other positives, hard negatives.

    Cosines as ``cos_sim`` (normalize, one matmul), not sentence-transformers' broadcast
    ``CosineSimilarity`` over a (B, N, D) tensor that a batch of thousands cannot hold; the two differ in
    rounding only. Gathering gathers the anchors too (sentence-transformers keeps its anchor-anchor
    term local), so W ranks of B see the candidates of one batch of W * B."""
    anchor, positive = embeddings[0], embeddings[1]  # (B, D)
    rows = torch.arange(len(anchor), device=anchor.device)
    columns, offset = gathered(list(embeddings), gather_across_devices)  # anchors, positives, negatives
    guides = [gather(g, with_grad=False)[0] if gather_across_devices else g for g in guide_embeddings]
    own = offset + rows  # anchor i's positive among the gathered rows
    local_guide = [g[offset: offset + len(anchor)] for g in guides]  # this rank's guide rows

    guided_ap = cos_sim(local_guide[0], guides[1])  # (B, W * B)
    positive_sim = guided_ap[rows, own].view(-1, 1)  # the guide's anchor-positive cosine
    limit = positive_sim - margin if margin_strategy == "absolute" else positive_sim - positive_sim.abs() * margin

    def filtered(scores: torch.Tensor, guided: torch.Tensor, own_cell: bool | None) -> torch.Tensor:
        mask = guided > limit  # the guide's likely false negatives
        if own_cell is not None:  # True: the positive stays; False: a text never competes with itself
            mask[rows, own] = not own_cell
        return scores.masked_fill(mask, -torch.inf)

    scores = [filtered(cos_sim(anchor, columns[1]), guided_ap, True)]
    if contrast_anchors:
        scores.append(filtered(cos_sim(anchor, columns[0]), cos_sim(local_guide[0], guides[0]), False))
    if contrast_positives:
        scores.append(filtered(cos_sim(positive, columns[1]), cos_sim(local_guide[1], guides[1]), False))
    for negatives, guided in zip(columns[2:], guides[2:]):  # the hard negatives: filtered, nothing kept
        scores.append(filtered(cos_sim(anchor, negatives), cos_sim(local_guide[0], guided), None))
    return F.cross_entropy(torch.cat(scores, dim=1) / temperature, own)


def cosine_similarity_loss(embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between cos(u, v) and the gold score in [0, 1] (``CosineSimilarityLoss``).

    ``torch.cosine_similarity`` as sentence-transformers calls it (its eps is 1e-8, on the norms'
    product), not ``cos_sim`` above: the two round differently near zero norms."""
    cosine = torch.cosine_similarity(embeddings[0], embeddings[1])  # (B,)
    return F.mse_loss(cosine, labels.to(cosine.dtype).view(-1))


def ranked_pairs_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum over pairs (i, j) with label_i < label_j of exp(s_i - s_j))``: every pair the gold
    scores order must be ordered so by the model's (CoSENT's form; ``scores`` already scaled)."""
    labels = labels.to(scores.dtype).view(-1)
    diff = scores[:, None] - scores[None, :]  # (B, B): s_i - s_j
    diff = diff.masked_fill(~(labels[:, None] < labels[None, :]), -torch.inf)  # only pairs ranked i < j
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)


def cosent_loss(embeddings: list[torch.Tensor], labels: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """``CoSENTLoss``: the ranked-pairs loss over ``scale * cos(u_i, v_i)``."""
    return ranked_pairs_loss(pairwise_cos_sim(embeddings[0], embeddings[1]) * scale, labels)


def angle_similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' ``pairwise_angle_sim``: |cos + sin| of the pair read as complex vectors
    (dimension i is the real part, i + D/2 the imaginary one) after L2 normalization; an odd D is padded."""
    if u.shape[1] % 2:
        u, v = F.pad(u, (0, 1)), F.pad(v, (0, 1))
    u, v = normalize(u), normalize(v)
    (re_u, im_u), (re_v, im_v) = torch.chunk(u, 2, dim=1), torch.chunk(v, 2, dim=1)
    cosines = torch.sum(u * v, dim=1)
    sines = torch.sum(im_u * re_v - re_u * im_v, dim=1)
    return torch.abs(cosines + sines)  # (B,)


def angle_loss(embeddings: list[torch.Tensor], labels: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """``AnglELoss``: the ranked-pairs loss over ``scale * angle_similarity(u_i, v_i)``."""
    return ranked_pairs_loss(angle_similarity(embeddings[0], embeddings[1]) * scale, labels)


def shrink(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` coordinates, L2-normalized (sentence-transformers' Matryoshka ``shrink``)."""
    return normalize(x[..., :dim])


def matryoshka_loss(embeddings: list[torch.Tensor], labels: torch.Tensor | None, *, loss: tuple,
                    matryoshka_dims: tuple[int, ...], matryoshka_weights: tuple[float, ...],
                    n_dims_per_step: int = -1, rng=None, **extra) -> torch.Tensor:
    """``MatryoshkaLoss``: the inner loss on the embeddings cut to each of ``matryoshka_dims`` (and
    renormalized), weighted and summed. ``n_dims_per_step`` > 0: that many dims drawn per step (``rng``,
    as sentence-transformers' ``random.sample``). ``extra`` (a guide's embeddings) goes to the inner loss
    untouched: sentence-transformers cuts only the trained model's output."""
    inner, inner_params = loss
    indices = range(len(matryoshka_dims))
    if 0 < n_dims_per_step < len(indices):
        indices = sorted(rng.sample(indices, n_dims_per_step))
    total = 0.0
    for i in indices:
        cut = [shrink(e, matryoshka_dims[i]) for e in embeddings]
        total = total + matryoshka_weights[i] * inner.fn(cut, labels, **inner_params, **extra)
    return total


# ---------------------------------------------------------------------------------------------------
# The table and the recipe's loss_params


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., torch.Tensor]
    columns: range  # how many text columns the loss accepts
    scored: bool  # whether it needs a score per example
    params: tuple[str, ...]  # the loss_params a recipe may set
    cached: bool = False  # gradient caching: ``mini_batch_size`` goes to the loop (cached.py)
    guided: bool = False  # ``guide``: a model whose embeddings the loop passes as ``guide_embeddings``


MNR_PARAMS = ("scale", "similarity_fct", "gather_across_devices")
GIST_PARAMS = ("guide", "temperature", "margin_strategy", "margin", "contrast_anchors", "contrast_positives",
               "gather_across_devices")
ANY = range(2, 1 << 16)  # anchor, positive and any number of hard negatives

# Names as the model cards print them (the class name; the full dotted path is accepted too).
LOSSES = {
    "MultipleNegativesRankingLoss": Loss(multiple_negatives_ranking_loss, ANY, False, MNR_PARAMS),
    "CachedMultipleNegativesRankingLoss": Loss(multiple_negatives_ranking_loss, ANY, False,
                                               MNR_PARAMS + ("mini_batch_size",), cached=True),
    "MultipleNegativesSymmetricRankingLoss": Loss(multiple_negatives_symmetric_ranking_loss, ANY, False, MNR_PARAMS),
    "GISTEmbedLoss": Loss(gist_embed_loss, range(2, 4), False, GIST_PARAMS, guided=True),
    "CachedGISTEmbedLoss": Loss(gist_embed_loss, range(2, 4), False, GIST_PARAMS + ("mini_batch_size",),
                                cached=True, guided=True),
    "CosineSimilarityLoss": Loss(cosine_similarity_loss, range(2, 3), True, ()),
    "CoSENTLoss": Loss(cosent_loss, range(2, 3), True, ("scale",)),
    "AnglELoss": Loss(angle_loss, range(2, 3), True, ("scale",)),
    "MatryoshkaLoss": Loss(matryoshka_loss, ANY, False, ("loss", "matryoshka_dims", "matryoshka_weights",
                                                         "n_dims_per_step")),
}


def describe_columns(columns: range) -> str:
    if len(columns) == 1:
        return str(columns.start)
    return f"{columns.start} or more" if columns.stop > 100 else f"{columns.start} to {columns.stop - 1}"


def get_loss(name: str, params: dict) -> tuple[Loss, dict]:
    """The loss named ``name`` (``MultipleNegativesRankingLoss`` or the card's full dotted path) and its
    checked parameters; a ValueError names what is wrong. A wrapper's ``loss`` becomes (Loss, params) and
    the wrapper takes its inner loss's columns, score and flags."""
    short = name.rsplit(".", 1)[-1] if isinstance(name, str) else name
    if short not in LOSSES:
        raise ValueError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
    loss = LOSSES[short]
    if not isinstance(params, dict):
        raise ValueError(f"{short}'s loss_params must be a JSON object")
    unknown_keys(params, loss.params, f"{short}'s loss_params", error=ValueError)
    params = dict(params)
    for key in ("scale", "temperature"):
        if key in params:
            params[key] = positive_number(params[key], f"{short}: {key}")
    if "margin" in params:
        margin = params["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"{short}: margin={margin!r} must be a number")
    if params.get("margin_strategy", "absolute") not in ("absolute", "relative"):
        raise ValueError(f"{short}: margin_strategy={params['margin_strategy']!r} is not absolute or relative")
    for key in ("gather_across_devices", "contrast_anchors", "contrast_positives"):
        if key in params and not isinstance(params[key], bool):
            raise ValueError(f"{short}: {key}={params[key]!r} must be true or false")
    if "mini_batch_size" in params:
        m = params["mini_batch_size"]
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"{short}: mini_batch_size={m!r} must be an integer >= 1")
    if loss.guided and not isinstance(params.get("guide"), str):
        raise ValueError(f"{short}: loss_params.guide must name the guide model (a folder, short name or hub id)")
    if "similarity_fct" in params:
        # The cards print the function's name; "util.cos_sim" and the full path are the same function.
        fct = params["similarity_fct"]
        params["similarity_fct"] = fct.rsplit(".", 1)[-1] if isinstance(fct, str) else fct
        if params["similarity_fct"] not in SIMILARITIES:
            raise ValueError(f"{short}: similarity_fct={fct!r} is not one of {', '.join(SIMILARITIES)}")
    if short == "MatryoshkaLoss":
        return matryoshka(loss, params)
    return loss, params


def matryoshka(loss: Loss, params: dict) -> tuple[Loss, dict]:
    """MatryoshkaLoss's params: the inner loss resolved, dims and weights sorted by dim, largest first
    (as sentence-transformers sorts them), and the inner loss's columns, score and flags taken over."""
    inner = params.get("loss")
    if not isinstance(inner, dict) or "loss" not in inner:
        raise ValueError('MatryoshkaLoss: loss_params.loss must be {"loss": NAME, "loss_params": {...}}')
    unknown_keys(inner, ("loss", "loss_params"), "MatryoshkaLoss's loss_params.loss", error=ValueError)
    if str(inner["loss"]).rsplit(".", 1)[-1] == "MatryoshkaLoss":
        raise ValueError("MatryoshkaLoss: the inner loss cannot be MatryoshkaLoss again")
    inner_loss, inner_params = get_loss(inner["loss"], inner.get("loss_params", {}) or {})
    dims = params.get("matryoshka_dims")
    if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                         for d in dims):
        raise ValueError(f"MatryoshkaLoss: matryoshka_dims={dims!r} must be a non-empty list of positive integers")
    weights = params.get("matryoshka_weights") or [1] * len(dims)
    if len(weights) != len(dims) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ValueError("MatryoshkaLoss: matryoshka_weights must be as many numbers as matryoshka_dims")
    n = params.get("n_dims_per_step", -1)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"MatryoshkaLoss: n_dims_per_step={n!r} must be an integer")
    dims, weights = zip(*sorted(zip(dims, weights), key=lambda dw: dw[0], reverse=True))
    wrapped = Loss(matryoshka_loss, inner_loss.columns, inner_loss.scored, loss.params, inner_loss.cached,
                   inner_loss.guided)
    return wrapped, {"loss": (inner_loss, inner_params), "matryoshka_dims": dims, "matryoshka_weights": weights,
                     "n_dims_per_step": n}


def positive_number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what}={value!r} must be a positive number")
    return float(value)


def call_params(params: dict) -> dict:
    """The params the loss function takes: the loop's keys (guide, mini_batch_size) left out, at every level."""
    out = {k: v for k, v in params.items() if k not in ("guide", "mini_batch_size")}
    if "loss" in out and isinstance(out["loss"], tuple):
        inner, inner_params = out["loss"]
        out["loss"] = (inner, call_params(inner_params))
    return out


def loop_param(params: dict, key: str):
    """A loop key (guide, mini_batch_size) of the loss or of a wrapper's inner loss; None when absent."""
    if key in params:
        return params[key]
    if isinstance(params.get("loss"), tuple):
        return loop_param(params["loss"][1], key)
    return None
