"""What fine-tuning switches on an encoder (``SentenceEncoder.mode``) and how it embeds with gradients
(``SentenceEncoder.embed_for_training``): the reference forward, never the packed path, whose fused
weights are copies that training would not update."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def mode(encoder, train: bool):
    """The trainable modules in train mode with gradients (``train=True``) or in eval mode without
    (``train=False``, the packed path rebuilt first) for the block; their previous mode after it, and
    the packed path rebuilt from the trained weights on leaving train mode."""
    modules = encoder.trainable_modules()
    before = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m in modules:
        m.train(train).requires_grad_(train)
    if not train:
        encoder.rebuild_runner()
    try:
        yield encoder
    finally:
        for m, training, grads in before:
            m.train(training)
            for p, grad in zip(m.parameters(), grads):
                p.requires_grad_(grad)
        if train:
            encoder.rebuild_runner()


def embed(encoder, texts: list[str]) -> torch.Tensor:
    """Texts (no prompt) -> (n, D): the reference runner (padded groups of equal length, the reference
    forward, pooling run eagerly), then the modules after Pooling: the same step inference's reference
    path runs. (``fit`` trains only models without WeightedLayerPooling: ``trainable_modules``.)"""
    ids = encoder.tokenizer.encode_ids(texts)
    return encoder.head(encoder._reference.embed(ids, compile=False))


def evaluate(encoder, evaluator, output_path: str | None = None):
    """The evaluator's result; ``output_path`` (where it writes its CSV) created first."""
    if output_path is not None:
        os.makedirs(output_path, exist_ok=True)
    return evaluator(encoder, output_path)


class ModelCardData:
    """Where sentence-transformers' evaluators record their metrics (``set_evaluation_metrics``)."""

    def __init__(self):
        self.eval_results: list[dict] = []

    def set_evaluation_metrics(self, evaluator, metrics: dict, epoch: int = 0, step: int = 0) -> None:
        self.eval_results.append({"evaluator": type(evaluator).__name__, "metrics": dict(metrics),
                                  "epoch": epoch, "step": step})
