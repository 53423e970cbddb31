"""sentence-transformers' evaluators run on an encoder: ``evaluator(encoder, output_path)``, which
records its metrics in ``encoder.model_card_data``."""

from __future__ import annotations

import os


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
