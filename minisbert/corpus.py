"""Embedding a corpus that does not fit in one list: ``minisbert embed-corpus``.

A job reads JSON Lines, Parquet, CSV/TSV or plain-text files, cuts every file into **parts** of
``rows_per_part`` rows (part k of a file holds its rows ``k*R .. (k+1)*R - 1``), embeds each part
with ``SentenceEncoder.encode`` (so token-budget batches, longest first, exactly as ``encode`` runs
them) and writes one Parquet file per part::

    OUT/_manifest.json                settings, model, inputs (size, mtime), rows; "complete" at the end
    OUT/part-00000-000000.parquet     id column + "embedding" (fixed-size list of float32 / int8 / ...)
    OUT/part-00000-000001.parquet     ...  (part-<input file>-<part>)

Guarantees, and how:

- **every row once**: a part's rows are fixed by the input, not by scheduling, and a part file is
  written under a temporary name and renamed when complete (``write_part``), so a part is there whole
  or not at all, and writing it twice writes the same file;
- **resume**: ``resume=True`` keeps the part files that are there and redoes only the missing ones;
  a folder whose manifest has other settings or inputs (path, size, mtime) is refused;
- **streaming**: one part's rows and embeddings are in memory at a time (the Ray engine: one per
  actor). A first pass over the inputs counts rows and notes where each part starts (byte offsets),
  which gives the progress bar its total and lets any process read any part without the others;
- **bad rows** (not a string, null, undecodable, broken JSON, wrong field count) stop the job with the
  file and row, or with ``skip_bad_rows`` are left out and listed: in the part file's Parquet metadata
  while running, in the manifest at the end.

The default id is the row's position in the inputs taken one after the other (0-based; skipped rows
keep their positions). The local engine is ``run_local`` (this process, or worker processes that
each embed whole parts); ``minisbert.ray_data`` runs the same parts on a Ray cluster.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import queue
import socket
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from minisbert import __version__
from minisbert.encoder import SentenceEncoder
from minisbert.errors import MinisbertError, MissingDependencyError
from minisbert.loading import parse_dtype
from minisbert.pool import threads_per_worker
from minisbert.quantize import PRECISIONS, quantize_embeddings

log = logging.getLogger("minisbert")

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv",
           ".txt": "text", ".text": "text"}
MANIFEST = "_manifest.json"  # "_": skipped by pyarrow, pandas, Ray and Spark when they read the folder
MANIFEST_FORMAT = "minisbert-embed-corpus/1"
BAD_ROWS_KEY = b"minisbert.bad_rows"  # a part file's Parquet metadata: its skipped rows, as JSON
# int8/uint8 need one (min, max) per dimension for the whole corpus, not per part (sentence-transformers
# computes them from whatever it is given): taken from the embeddings of the first rows, stored in the
# manifest, and every part quantizes with them.
CALIBRATION_ROWS = 1024


class CorpusError(MinisbertError, ValueError):
    """An input, output folder or setting that ``embed-corpus`` cannot work with; names the file."""


def pyarrow():
    """pyarrow (Parquet in and out), an optional dependency: ``pip install minisbert[corpus]``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401  (the submodule, loaded once here)
    except ImportError:
        raise MissingDependencyError("embed-corpus writes Parquet through pyarrow: pip install 'minisbert[corpus]' "
                                     "(or pip install pyarrow)") from None
    return pa


# -- what a job is ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Everything that decides the output's content; a resumed run must have the same."""
    model: str
    revision: str | None = None
    dtype: str = "float32"
    max_seq_length: int | None = None  # None: the model's own
    precision: str = "float32"
    normalize: bool = False
    text_column: str = "text"
    id_column: str | None = None  # None: the row's position in the inputs
    rows_per_part: int = 4096
    skip_bad_rows: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise CorpusError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.rows_per_part < 1:
            raise CorpusError(f"rows_per_part must be >= 1, got {self.rows_per_part}")


@dataclass(frozen=True)
class Source:
    """One input file as the first pass found it."""
    index: int
    path: str  # absolute
    format: str  # jsonl, parquet, csv, tsv, text
    size: int
    mtime_ns: int
    rows: int = 0
    first_id: int = 0  # the position of its first row in all the inputs
    columns: tuple[str, ...] = ()  # CSV/TSV: the header; Parquet: the schema's names
    # (byte offset, line number) where each part starts; line formats only (Parquet reads row groups).
    starts: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    def identity(self) -> dict:
        """What the manifest records of it and a resumed run compares."""
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Part:
    """Rows ``first_row .. first_row + rows - 1`` of input ``source``."""
    source: int
    index: int
    first_row: int
    rows: int

    @property
    def name(self) -> str:
        return f"part-{self.source:05d}-{self.index:06d}.parquet"


@dataclass(frozen=True)
class Job:
    """A planned job: what every engine (and every Ray actor) needs to embed and write any part."""
    settings: Settings
    output: str
    sources: tuple[Source, ...]
    id_name: str  # the output's id column
    id_type: str  # "int64" or "string"
    dimension: int = 0  # the model's embedding width (before binary packing)
    ranges: list | None = None  # int8/uint8: (2, dimension) min/max for quantization

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)

    def parts(self) -> list[Part]:
        R = self.settings.rows_per_part
        return [Part(s.index, k, k * R, min(R, s.rows - k * R)) for s in self.sources for k in range(-(-s.rows // R))]


# -- reading ---------------------------------------------------------------------------------------

def input_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise CorpusError(f"{path}: unknown input format {suffix or '(no extension)'!r}; name the file "
                          f"{', '.join(FORMATS)}")
    return FORMATS[suffix]


class _Lines:
    """Decoded lines of a binary file for ``csv.reader``, keeping the byte offset and line number of
    what was consumed (csv.reader reads no further than the end of the record it returns)."""

    def __init__(self, f, offset: int, line: int):
        self.f, self.offset, self.line, self.undecodable = f, offset, line, False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = next(self.f)
        self.offset += len(raw)
        self.line += 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.undecodable = True
            return raw.decode("utf-8", "surrogateescape")


def records(f, fmt: str, offset: int, line: int) -> Iterator[tuple[int, int, object]]:
    """(byte offset, line number, raw record) of the rows of a line-format file from ``offset``
    (which is at the start of line ``line + 1``): a text line, a JSON line, or a CSV/TSV record
    (fields, undecodable). JSON Lines skip blank lines and CSV/TSV empty records: they are no rows."""
    f.seek(offset)
    if fmt in ("text", "jsonl"):
        for raw in f:
            line += 1
            if fmt == "text" or raw.strip():
                yield offset, line, raw
            offset += len(raw)
        return
    lines = _Lines(f, offset, line)
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(lines)
    while True:
        start, first_line, lines.undecodable = lines.offset, lines.line + 1, False
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # e.g. a NUL byte or a field past csv's size limit
            fields = e
        if fields != []:
            yield start, first_line, (fields, lines.undecodable)


def plan_source(index: int, path: str, rows_per_part: int, first_id: int, text_column: str,
                id_column: str | None) -> Source:
    """The first pass over one input: its rows, its parts' starts, its columns (checked here)."""
    p = Path(path).resolve()
    if not p.is_file():
        raise CorpusError(f"--input {path}: {'not a regular file' if p.exists() else 'no such file'}")
    fmt = input_format(p)
    info = p.stat()
    src = Source(index, str(p), fmt, info.st_size, info.st_mtime_ns, first_id=first_id)
    wanted = [text_column] + ([id_column] if id_column else [])
    if fmt == "text" and id_column:
        raise CorpusError(f"{p}: a plain-text input has no columns, so no --id-column {id_column!r}")
    if fmt == "parquet":
        pa = pyarrow()
        meta = pa.parquet.ParquetFile(p).metadata
        schema = meta.schema.to_arrow_schema()
        check_columns(src, schema.names, wanted)
        kind = schema.field(text_column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise CorpusError(f"{p}: column {text_column!r} holds {kind}, not strings")
        return replace(src, rows=meta.num_rows, columns=tuple(schema.names))
    starts, rows, columns, line = [], 0, (), 0
    with open(p, "rb") as f:
        offset = 0
        if fmt in ("csv", "tsv"):
            columns, offset, line = read_header(f, fmt, p)
            check_columns(src, columns, wanted)
        for start, first_line, _ in records(f, fmt, offset, line):
            if rows % rows_per_part == 0:
                starts.append((start, first_line - 1))
            rows += 1
    return replace(src, rows=rows, columns=columns, starts=tuple(starts))


def read_header(f, fmt: str, path: Path) -> tuple[tuple[str, ...], int, int]:
    """A CSV/TSV file's column names, and the byte offset and line count after its header record."""
    lines = _Lines(f, 0, 0)
    try:
        names = next(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(lines))
    except (StopIteration, csv.Error):
        names = None
    if not names or lines.undecodable:
        raise CorpusError(f"{path}: the first line must be a UTF-8 header naming the columns ({fmt.upper()})")
    return tuple(names), lines.offset, lines.line


def check_columns(src: Source, names, wanted: list[str]) -> None:
    for name in wanted:
        if name not in names:
            raise CorpusError(f"{src.path}: no column {name!r} (it has {', '.join(map(repr, names)) or 'none'}); "
                              f"choose with --text-column / --id-column")


def id_type_of(src: Source, id_column: str | None) -> str:
    """The id column's type this input gives: positions are int64; CSV/TSV fields are strings; JSON
    Lines take the first row's id type; Parquet its column type (integers as int64)."""
    if id_column is None or src.format in ("csv", "tsv"):
        return "int64" if id_column is None else "string"
    if src.format == "parquet":
        pa = pyarrow()
        kind = pa.parquet.ParquetFile(src.path).schema_arrow.field(id_column).type
        if pa.types.is_integer(kind):
            return "int64"
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return "string"
        raise CorpusError(f"{src.path}: id column {id_column!r} holds {kind}; ids must be integers or strings")
    if src.format == "jsonl" and src.rows:
        with open(src.path, "rb") as f:
            _, _, raw = next(records(f, "jsonl", 0, 0))
        try:
            value = json.loads(raw).get(id_column)
        except (ValueError, AttributeError):
            value = None
        return "int64" if isinstance(value, int) and not isinstance(value, bool) else "string"
    return "string"


def plan(inputs: list[str], settings: Settings, output: str) -> Job:
    """The first pass over every input: a ``Job`` (without the model's dimension and ranges)."""
    if not inputs:
        raise CorpusError("no --input given")
    sources, first_id = [], 0
    for i, path in enumerate(inputs):
        src = plan_source(i, path, settings.rows_per_part, first_id, settings.text_column, settings.id_column)
        sources.append(src)
        first_id += src.rows
    types = {s.path: id_type_of(s, settings.id_column) for s in sources if s.rows}
    if len(set(types.values())) > 1:
        raise CorpusError(f"the id column {settings.id_column!r} has different types across the inputs "
                          f"({', '.join(f'{p}: {t}' for p, t in types.items())})")
    return Job(settings, str(Path(output).resolve()), tuple(sources), settings.id_column or "id",
               next(iter(types.values()), "int64"))


@dataclass
class PartRows:
    """One part as read: the good rows' ids and texts, and the bad rows (file, row, line, reason)."""
    ids: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)


def read_part(job: Job, part: Part) -> PartRows:
    """The rows of one part, each checked; a bad row raises CorpusError unless ``skip_bad_rows``."""
    src, s = job.sources[part.source], job.settings
    out = PartRows()
    for row, line, text, id_value, reason in (read_parquet_rows(job, src, part) if src.format == "parquet"
                                              else read_line_rows(job, src, part)):
        if reason is None and s.id_column is not None:
            reason = check_id(id_value, s.id_column, job.id_type)
        if reason is not None:
            where = f"{src.path}: row {row}" + (f" (line {line})" if line else "")
            if not s.skip_bad_rows:
                raise CorpusError(f"{where}: {reason}; pass --skip-bad-rows to leave such rows out "
                                  f"(they are listed in the manifest)")
            out.bad.append({"file": src.path, "row": row, **({"line": line} if line else {}), "reason": reason})
            continue
        out.ids.append(src.first_id + row if s.id_column is None else id_value)
        out.texts.append(text)
    return out


def check_id(value, name: str, id_type: str) -> str | None:
    if value is None:
        return f"{name!r} is missing or null"
    if id_type == "int64" and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"{name!r} is {value!r}, not an integer like the first row's"
    if id_type == "string" and not isinstance(value, str):
        return f"{name!r} is {value!r}, not a string like the first row's"
    return None


def read_line_rows(job: Job, src: Source, part: Part):
    """(row, line, text, id, bad reason) of one part of a text, JSON Lines or CSV/TSV file."""
    s = job.settings
    offset, first_line = src.starts[part.index]
    if src.format in ("csv", "tsv"):
        text_at = src.columns.index(s.text_column)
        id_at = src.columns.index(s.id_column) if s.id_column else None
    with open(src.path, "rb") as f:
        for i, (_, line, raw) in enumerate(records(f, src.format, offset, first_line)):
            if i == part.rows:
                break
            row, text, id_value, reason = part.first_row + i, None, None, None
            if src.format in ("csv", "tsv"):
                fields, undecodable = raw
                if isinstance(fields, csv.Error):
                    reason = f"not a valid {src.format.upper()} record ({fields})"
                elif undecodable:
                    reason = "not UTF-8 text"
                elif len(fields) != len(src.columns):
                    reason = f"{len(fields)} fields, the header has {len(src.columns)}"
                else:
                    text = fields[text_at]
                    id_value = fields[id_at] if id_at is not None else None
            else:
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    reason = f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                else:
                    if src.format == "text":
                        text = decoded.removesuffix("\n").removesuffix("\r")
                    else:
                        text, id_value, reason = json_row(decoded, s.text_column, s.id_column)
            yield row, line, text, id_value, reason


def json_row(line: str, text_column: str, id_column: str | None):
    """(text, id, bad reason) of one JSON line."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        return None, None, f"not valid JSON ({e})"
    if not isinstance(obj, dict):
        return None, None, f"a JSON {type(obj).__name__}, not an object"
    text = obj.get(text_column)
    if not isinstance(text, str):
        return None, None, (f"no {text_column!r} field" if text_column not in obj else
                            f"{text_column!r} is {json.dumps(text)[:40]}, not a string")
    return text, obj.get(id_column) if id_column else None, None


def read_parquet_rows(job: Job, src: Source, part: Part):
    """(row, None, text, id, bad reason) of one part of a Parquet file: the row groups it overlaps."""
    pa, s = pyarrow(), job.settings
    f = pa.parquet.ParquetFile(src.path)
    columns = [s.text_column] + ([s.id_column] if s.id_column else [])
    groups, first, start = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if start < part.first_row + part.rows and start + n > part.first_row:
            groups.append(g)
            first = start if first is None else first
        start += n
    table = f.read_row_groups(groups, columns=columns).slice(part.first_row - first, part.rows)
    texts = table.column(s.text_column).to_pylist()
    ids = table.column(s.id_column).to_pylist() if s.id_column else [None] * len(texts)
    for i, (text, id_value) in enumerate(zip(texts, ids)):
        reason = f"{s.text_column!r} is null" if text is None else None
        yield part.first_row + i, None, text, id_value, reason


# -- embedding and writing -------------------------------------------------------------------------

def load_encoder(settings: Settings, device: str = "cpu") -> SentenceEncoder:
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
    tmp = target.with_name(f".{part.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        pa.parquet.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def embedding_width(job: Job) -> int:
    """Values per embedding in the output: the dimension, or its bits packed 8 to a byte for binary."""
    return -(-job.dimension // 8) if job.settings.precision.endswith("binary") else job.dimension


def part_written(job: Job, part: Part) -> tuple[int, list[dict]] | None:
    """(rows, bad rows) of a part file that is complete, else None (missing, unreadable, or short)."""
    path = Path(job.output) / part.name
    if not path.is_file():
        return None
    try:
        meta = pyarrow().parquet.read_metadata(path)
        bad = json.loads((meta.metadata or {}).get(BAD_ROWS_KEY, b"[]"))
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); it is written again", path, e)
        return None
    return (meta.num_rows, bad) if meta.num_rows + len(bad) == part.rows else None


def do_part(job: Job, part: Part, encoder: SentenceEncoder, batch_size: int) -> tuple[int, int]:
    """Read, embed and write one part; (rows written, rows skipped)."""
    rows, s = read_part(job, part), job.settings
    emb = embed_texts(encoder, rows.texts, batch_size, s.normalize, s.precision, job.ranges)
    write_part(job, part, rows, emb)
    return len(rows.ids), len(rows.bad)


# -- the manifest and resuming ---------------------------------------------------------------------

def manifest(job: Job, **extra) -> dict:
    return {"format": MANIFEST_FORMAT, "minisbert_version": __version__, "settings": asdict(job.settings),
            "dimension": job.dimension, "embedding": {"column": "embedding", "type": embedding_type(job),
                                                      "width": embedding_width(job)},
            "id_column": {"name": job.id_name, "type": job.id_type,
                          "source": job.settings.id_column or "position in the inputs"},
            "quantization_ranges": job.ranges, "rows": job.rows,
            "inputs": [{**s.identity(), "rows": s.rows} for s in job.sources], "complete": False, **extra}


def embedding_type(job: Job) -> str:
    return {"float32": "float32", "int8": "int8", "uint8": "uint8", "binary": "int8",
            "ubinary": "uint8"}[job.settings.precision]


def write_manifest(job: Job, data: dict) -> None:
    path = Path(job.output) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_output(job: Job, resume: bool) -> Job:
    """Create the output folder, or check it for ``resume``: the same settings and inputs, else refused.
    Returns the job with the manifest's quantization ranges when resuming."""
    out = Path(job.output)
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--output {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise CorpusError(f"--output {out}: not writable")
    path = out / MANIFEST
    if not path.is_file():
        if any(out.glob("part-*.parquet")):
            raise CorpusError(f"--output {out}: holds part files but no {MANIFEST}; refused (use an empty folder)")
        return job
    if not resume:
        raise CorpusError(f"--output {out}: already holds a job ({MANIFEST}); pass --resume to finish it, or "
                          f"choose an empty folder")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorpusError(f"{path}: unreadable ({e})") from None
    new = manifest(job)
    for key, value in new["settings"].items():
        if old.get("settings", {}).get(key) != value:
            raise CorpusError(f"--resume: {out} was made with {key}={old.get('settings', {}).get(key)!r}, this run "
                              f"has {key}={value!r}; refused (use the same settings or another folder)")
    before = [{k: v for k, v in i.items() if k != "rows"} for i in old.get("inputs", [])]
    now = [s.identity() for s in job.sources]
    if before != now:
        changed = next((f"{a['path']} (size {a['size']}, mtime_ns {a['mtime_ns']})" for a, b in zip(before, now)
                        if a != b), f"{len(before)} input files then, {len(now)} now")
        raise CorpusError(f"--resume: the inputs are not the ones {out} was made from: {changed}; refused")
    for tmp in out.glob(".part-*.tmp"):  # a killed run's unfinished writes
        tmp.unlink(missing_ok=True)
    return replace(job, ranges=old.get("quantization_ranges"))


def calibrate(job: Job, encoder: SentenceEncoder, batch_size: int) -> Job:
    """int8/uint8: per-dimension (min, max) over the first ``CALIBRATION_ROWS`` good rows' embeddings."""
    if not job.settings.precision.endswith("int8") or job.ranges is not None:
        return job
    texts = []
    for part in job.parts():
        texts += read_part(job, part).texts
        if len(texts) >= CALIBRATION_ROWS:
            break
    texts = texts[:CALIBRATION_ROWS]
    if len(texts) < 2:
        raise CorpusError(f"precision={job.settings.precision!r} needs at least 2 rows to compute its ranges")
    emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=job.settings.normalize,
                         show_progress_bar=False)
    return replace(job, ranges=np.stack([emb.min(axis=0), emb.max(axis=0)]).tolist())


def start(job: Job, encoder: SentenceEncoder, batch_size: int = 32) -> Job:
    """A planned, prepared job completed from the driver's encoder (dimension; int8/uint8 ranges unless a
    resumed manifest had them), its manifest written before any part."""
    job = calibrate(replace(job, dimension=encoder.get_sentence_embedding_dimension()), encoder, batch_size)
    write_manifest(job, manifest(job))
    return job


def finish(job: Job) -> dict:
    """Check every part is written whole, then mark the manifest complete with the rows and bad rows."""
    parts, bad, missing = [], [], []
    for part in job.parts():
        written = part_written(job, part)
        if written is None:
            missing.append(part.name)
            continue
        parts.append({"name": part.name, "source": part.source, "first_row": part.first_row, "rows": written[0]})
        bad += written[1]
    if missing:
        raise CorpusError(f"{job.output}: {len(missing)} parts missing after the run ({', '.join(missing[:5])}...)")
    data = manifest(job, complete=True, rows_written=sum(p["rows"] for p in parts), bad_rows=bad, parts=parts)
    write_manifest(job, data)
    return data


def progress_bar(job: Job, done: int, show: bool | None):
    show = sys.stderr.isatty() if show is None else show
    return tqdm(total=job.rows, initial=done, unit="row", desc="embed-corpus", disable=not show, smoothing=0.1)


# -- the local engine ------------------------------------------------------------------------------

def run_local(job: Job, encoder: SentenceEncoder, batch_size: int = 32, workers: int = 1,
              show_progress: bool | None = None) -> dict:
    """Embed the parts not yet written: one after the other in this process with ``encoder``
    (``workers=1``), or by ``workers`` worker processes (``part_worker``); then ``finish``."""
    todo = [p for p in job.parts() if part_written(job, p) is None]
    bar = progress_bar(job, job.rows - sum(p.rows for p in todo), show_progress)
    try:
        if workers == 1:
            for part in todo:
                do_part(job, part, encoder, batch_size)
                bar.update(part.rows)
        elif todo:
            for part in run_workers(job, todo, workers, batch_size, str(encoder.device)):
                bar.update(part.rows)
    finally:
        bar.close()
    return finish(job)


def run_workers(job: Job, todo: list[Part], workers: int, batch_size: int, device: str) -> Iterator[Part]:
    """The parts of ``todo`` embedded by ``workers`` spawned processes (at most one per part), each with
    its own encoder and ``cores // workers`` torch threads; yields each part as it is written.

    Spawned, not forked: a forked child inherits torch's OpenMP pool as dead threads and can hang. A
    worker reads, embeds and writes whole parts, so this process only hands out part numbers: no
    texts or embeddings cross between processes. A worker's bad-row error stops the job with its
    message; a worker that dies (killed, out of memory) stops it too, and ``--resume`` goes on."""
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    workers = min(workers, len(todo))
    threads = threads_per_worker(workers)  # the pool's rule: workers x threads <= cores
    for i in range(len(todo)):
        tasks.put(i)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=part_worker, args=(job, todo, batch_size, device, threads, tasks, results),
                         daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    try:
        for _ in todo:
            while True:
                try:
                    i, error = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
                    if dead:
                        raise CorpusError(f"a worker process died (exit code {dead[0].exitcode}); the parts written "
                                          f"are kept: run again with --resume") from None
            if error:
                raise CorpusError(error)
            yield todo[i]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()


def part_worker(job: Job, todo: list[Part], batch_size: int, device: str, threads: int, tasks, results) -> None:
    """A worker process: one encoder, then each part number it takes from ``tasks`` until None;
    reports (part number, error message or "")."""
    torch.set_num_threads(threads)
    encoder = load_encoder(job.settings, device)
    for i in iter(tasks.get, None):
        try:
            do_part(job, todo[i], encoder, batch_size)
            results.put((i, ""))
        except CorpusError as e:
            results.put((i, str(e)))


def embed_corpus(inputs: list[str], output: str, settings: Settings, *, resume: bool = False, batch_size: int = 32,
                 workers: int = 1, device: str = "cpu", encoder: SentenceEncoder | None = None,
                 show_progress: bool | None = None) -> dict:
    """``embed-corpus --engine local`` from Python: plan the inputs, check the folder (before the model
    loads), load the encoder (or use ``encoder``, loaded from ``settings.model``), write the manifest,
    embed the missing parts. Returns the final manifest."""
    job = prepare_output(plan(inputs, settings, output), resume)
    encoder = encoder or load_encoder(settings, device)
    return run_local(start(job, encoder, batch_size), encoder, batch_size, workers, show_progress)
