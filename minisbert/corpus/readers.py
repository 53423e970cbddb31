"""Reading a job's inputs: the first pass that plans parts, and one part's rows, each checked.

JSON Lines, CSV/TSV and plain text are read as lines from a byte offset the plan recorded, so any
process can read any part without the others; Parquet by row groups. A bad row (not a string, null,
undecodable, broken JSON, wrong field count) raises ``CorpusError`` naming the file, row and line,
or with ``skip_bad_rows`` is left out and listed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from minisbert.corpus.job import FORMATS, CorpusError, CorpusSettings, Job, Part, Source, pyarrow

log = logging.getLogger("minisbert")



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


def plan(inputs: list[str], settings: CorpusSettings, output: str) -> Job:
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
