"""One part embedded and written: a Parquet file under a temporary name, renamed when whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from minisbert.checks import parse_dtype
from minisbert.corpus.job import BAD_ROWS_KEY, CorpusSettings, Job, Part, pyarrow
from minisbert.corpus.readers import PartRows, read_part
from minisbert.encoder import SentenceEncoder
from minisbert.io.files import atomic_path
from minisbert.quantize import quantize_embeddings

log = logging.getLogger("minisbert")



def load_encoder(settings: CorpusSettings, device: str = "cpu") -> SentenceEncoder:
    """The job's encoder, as every engine and every worker loads it."""
    encoder = SentenceEncoder.from_pretrained(settings.model, device=device, dtype=parse_dtype(settings.dtype),
                                              revision=settings.revision)
    if settings.max_seq_length:
        encoder.max_seq_length = settings.max_seq_length
    return encoder


def embed_texts(encoder: SentenceEncoder, texts: list[str], batch_size: int = 32, normalize: bool = False,
                precision: str = "float32", ranges=None) -> np.ndarray:
    """``encode`` on one part's texts, then quantized to ``precision`` with the given (2, D) ``ranges``
    for int8/uint8: the one place every engine embeds."""
    if texts:
        emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=normalize, show_progress_bar=False)
    else:
        emb = np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    # Through quantize_embeddings for float32 too: encode returns the model's dtype (float16 for a float16
    # model, as sentence-transformers), and the parts hold what the manifest says, float32.
    return quantize_embeddings(emb, precision, ranges=None if ranges is None else np.asarray(ranges, np.float32))


def embedding_array(emb: np.ndarray):
    """(N, W) embeddings as an Arrow fixed-size list column of their dtype (float32, int8 or uint8)."""
    pa = pyarrow()
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(emb).reshape(-1)), emb.shape[1])


def write_part(job: Job, part: Part, rows: PartRows, emb: np.ndarray) -> Path:
    """The part's Parquet file, written under a temporary name, flushed and renamed: it exists whole or
    not at all, and a second write (a retried task) replaces it with the same rows."""
    pa = pyarrow()
    table = pa.table({job.id_name: pa.array(rows.ids, type=getattr(pa, job.id_type)()),
                      "embedding": embedding_array(emb)})
    table = table.replace_schema_metadata({BAD_ROWS_KEY: json.dumps(rows.bad, ensure_ascii=False).encode()})
    target = Path(job.output) / part.name
    with atomic_path(target, fsync=True) as tmp:
        pa.parquet.write_table(table, tmp)
    return target


def do_part(job: Job, part: Part, encoder: SentenceEncoder, batch_size: int) -> tuple[int, int]:
    """Read, embed and write one part; (rows written, rows skipped)."""
    rows, s = read_part(job, part), job.settings
    emb = embed_texts(encoder, rows.texts, batch_size, s.normalize, s.precision, job.ranges)
    write_part(job, part, rows, emb)
    return len(rows.ids), len(rows.bad)
