"""``minisbert embed-corpus``: a job and its manifest (``job.py``), input readers, the part writer, the
local engine, and the Ray engine (``ray_engine.py``, with ``Embedder`` for Ray Data pipelines).

``embed_corpus(inputs, output, CorpusSettings(model=...))`` runs a job here."""

from minisbert.corpus.job import CorpusError, CorpusSettings
from minisbert.corpus.local import embed_corpus

__all__ = ["CorpusError", "CorpusSettings", "embed_corpus"]
