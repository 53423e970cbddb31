"""Evaluation during training, as old_fit's ``_eval_during_training`` with the legacy
``EmbeddingSimilarityEvaluator``: the recipe's STS pairs scored in eval mode, one row of
``eval/similarity_evaluation_NAME_results.csv`` per evaluation (sentence-transformers' columns), and the
model saved whenever the score (the best of the four Spearman correlations, what that evaluator
returned) beats the best so far."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from minisbert.encoder import SentenceEncoder
from minisbert.sts import METRICS, evaluate_sts, read_sts

log = logging.getLogger("minisbert")


class Evaluator:
    """``evaluator(encoder, epoch, steps)`` scores, logs and (if best and ``save_best``) saves into ``output``."""

    def __init__(self, path: Path, output: Path | None, save_best: bool):
        self.pairs = read_sts(path)
        self.csv = output / "eval" / f"similarity_evaluation_{path.stem}_results.csv" if output is not None else None
        self.save_to = output if save_best else None
        self.rows: list[dict] = []  # epoch, steps, the 8 figures, score
        self.best: float | None = None

    def __call__(self, encoder: SentenceEncoder, epoch: int, steps: int) -> None:
        pairs = self.pairs
        # Eval mode, as the evaluator encodes; the packed path is rebuilt from the trained weights first.
        with encoder.mode(train=False):
            figures = evaluate_sts(encoder, pairs.sentences1, pairs.sentences2, pairs.scores)
            row = {"epoch": epoch, "steps": steps, **{k: figures[k] for k in METRICS}}
            row["score"] = max(figures[k] for k in METRICS if k.endswith("_spearman"))
            if self.best is None or row["score"] > self.best:
                self.best = row["score"]
                if self.save_to is not None:
                    encoder.save(self.save_to)
        self.rows.append(row)
        log.info("epoch %d, steps %d: cosine Spearman %.4f, score %.4f", epoch, steps, row["cosine_spearman"],
                 row["score"])
        self.write([row], append=True)

    def write(self, rows: list[dict], append: bool) -> None:
        if self.csv is None:
            return
        self.csv.parent.mkdir(parents=True, exist_ok=True)
        new = not append or not self.csv.exists()
        with open(self.csv, "a" if append else "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "steps", *METRICS])
            for row in rows:
                writer.writerow([row["epoch"], row["steps"], *(row[k] for k in METRICS)])

    def rewrite(self) -> None:
        """The CSV as ``rows`` say (a resumed run: evaluations after its saved state are dropped)."""
        self.write(self.rows, append=False)
