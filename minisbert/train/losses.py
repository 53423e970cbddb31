"""Training losses over sentence embeddings, equal to sentence-transformers' (6.2, and the legacy 2.x that
trained the seed models).

A loss is a small function ``loss(embeddings, labels, **params) -> scalar``: ``embeddings`` holds one
(B, D) tensor per text column of the batch (anchor, positive, negatives... or sentence1, sentence2),
``labels`` the (B,) float32 scores of a scored-pairs batch, or None. ``LOSSES`` maps the names the
model cards print to the function and what data it takes; another loss is one more function and row.

Shape legend: B batch (examples), D embedding width, K candidate columns (positive + hard negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minisbert.checks import unknown_keys
from minisbert.search import cos_sim, dot_score  # sentence_transformers.util's, as the losses use them

SIMILARITIES = {"cos_sim": cos_sim, "dot_score": dot_score}


def multiple_negatives_ranking_loss(embeddings: list[torch.Tensor], labels: torch.Tensor | None = None,
                                    scale: float = 20.0, similarity_fct: str = "cos_sim") -> torch.Tensor:
    """InfoNCE with in-batch negatives (``MultipleNegativesRankingLoss``).

    Anchor i must pick its own positive among every candidate of the batch: all B positives and, for
    triplets, all B hard negatives, so each row is a (B * K)-way classification whose answer is column i.
    Written as the legacy loss was, ``cross_entropy(scale * sim, arange(B))``; sentence-transformers 6.2
    computes the same ``-(s_ii - logsumexp_j s_ij)`` mean with the terms in another order.
    """
    anchors, candidates = embeddings[0], torch.cat(embeddings[1:])  # (B, D), (B * K, D)
    scores = SIMILARITIES[similarity_fct](anchors, candidates) * scale  # (B, B * K)
    target = torch.arange(len(anchors), device=scores.device)  # anchor i's positive is candidate i
    return F.cross_entropy(scores, target)


def cosine_similarity_loss(embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between cos(u, v) and the gold score in [0, 1] (``CosineSimilarityLoss``).

    ``torch.cosine_similarity`` as sentence-transformers calls it (its eps is 1e-8, on the norms'
    product), not ``cos_sim`` above: the two round differently near zero norms."""
    cosine = torch.cosine_similarity(embeddings[0], embeddings[1])  # (B,)
    return F.mse_loss(cosine, labels.to(cosine.dtype).view(-1))


@dataclass(frozen=True)
class Loss:
    fn: Callable[..., torch.Tensor]
    columns: tuple[int, ...]  # how many text columns the loss accepts
    scored: bool  # whether it needs a score per example
    params: tuple[str, ...]  # the loss_params a recipe may set


# Names as the model cards print them (the class name; the full dotted path is accepted too).
LOSSES = {
    "MultipleNegativesRankingLoss": Loss(multiple_negatives_ranking_loss, (2, 3), False, ("scale", "similarity_fct")),
    "CosineSimilarityLoss": Loss(cosine_similarity_loss, (2,), True, ()),
}


def get_loss(name: str, params: dict) -> tuple[Loss, dict]:
    """The loss named ``name`` (``MultipleNegativesRankingLoss`` or the card's full dotted path) and its
    checked parameters; a ValueError names what is wrong."""
    short = name.rsplit(".", 1)[-1] if isinstance(name, str) else name
    if short not in LOSSES:
        raise ValueError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
    loss = LOSSES[short]
    unknown_keys(params, loss.params, f"{short}'s loss_params", error=ValueError)
    params = dict(params)
    if "scale" in params:
        scale = params["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"{short}: scale={scale!r} must be a positive number")
        params["scale"] = float(scale)
    if "similarity_fct" in params:
        # The cards print the function's name; "util.cos_sim" and the full path are the same function.
        fct = params["similarity_fct"]
        params["similarity_fct"] = fct.rsplit(".", 1)[-1] if isinstance(fct, str) else fct
        if params["similarity_fct"] not in SIMILARITIES:
            raise ValueError(f"{short}: similarity_fct={fct!r} is not one of {', '.join(SIMILARITIES)}")
    return loss, params
