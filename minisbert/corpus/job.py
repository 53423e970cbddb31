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
each embed whole parts); ``corpus/ray_engine.py`` runs the same parts on a Ray cluster.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from minisbert import __version__
from minisbert.checks import integer
from minisbert.errors import CorpusError, MissingDependencyError
from minisbert.io.files import write_atomically
from minisbert.quantize import PRECISIONS

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

def pyarrow():
    """pyarrow (Parquet in and out), an optional dependency: ``pip install minisbert[corpus]``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401  (the submodule, loaded once here)
    except ImportError:
        raise MissingDependencyError("embed-corpus writes Parquet through pyarrow: pip install 'minisbert[corpus]' "
                                     "(or pip install pyarrow)") from None
    return pa



@dataclass(frozen=True)
class CorpusSettings:
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
        integer(self.rows_per_part, "rows_per_part", error=CorpusError)


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
    settings: CorpusSettings
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
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    write_atomically(Path(job.output) / MANIFEST, lambda f: f.write(text.encode("utf-8")))


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
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    start_over = f"delete {out} to start over, or choose another --output"
    if not path.is_file():
        if written:
            raise CorpusError(f"--output {out}: holds part files but no {MANIFEST} ({len(written)} parts of no "
                              f"job this run can finish); {start_over}")
        return job
    for tmp in out.glob(".part-*.tmp"):  # a killed run's unfinished writes
        tmp.unlink(missing_ok=True)
    if not written:
        # The job there finished no part (it stopped at a bad row, say): nothing to keep or to mix up with,
        # so this run starts it again with its own settings, --resume or not.
        log.warning("%s: the job there finished no part; starting it again with this run's settings", out)
        path.unlink()
        return job
    if not resume:
        raise CorpusError(f"--output {out}: already holds a job ({MANIFEST}, {len(written)} of {len(job.parts())} "
                          f"part files written); pass --resume to finish it with the same settings and inputs, or "
                          f"{start_over}")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CorpusError(f"{path}: unreadable ({e}); {start_over}") from None
    new = manifest(job)
    for key, value in new["settings"].items():
        if old.get("settings", {}).get(key) != value:
            raise CorpusError(f"--resume: {out} was made with {key}={old.get('settings', {}).get(key)!r}, this run "
                              f"has {key}={value!r}; resuming needs the settings its {len(written)} part files were "
                              f"made with: pass those, or {start_over}")
    before = [{k: v for k, v in i.items() if k != "rows"} for i in old.get("inputs", [])]
    now = [s.identity() for s in job.sources]
    if before != now:
        changed = next((f"{a['path']} (size {a['size']}, mtime_ns {a['mtime_ns']})" for a, b in zip(before, now)
                        if a != b), f"{len(before)} input files then, {len(now)} now")
        raise CorpusError(f"--resume: the inputs are not the ones {out} was made from: {changed}; its "
                          f"{len(written)} part files hold embeddings of the old inputs: {start_over}")
    return replace(job, ranges=old.get("quantization_ranges"))


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
