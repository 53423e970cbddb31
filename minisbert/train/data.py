"""Training data: readers for the recipes' formats, and the samplers that cut examples into batches.

An ``Examples`` holds each example's text columns (2 or 3 texts) and, for scored pairs, its gold score
in [0, 1]. The formats:

- ``korsts``: anything ``eval-sts`` reads (KorSTS TSV, KLUE-STS JSON, CSV/JSONL with sentence1,
  sentence2, score), score / 5, as the KorSTS training scripts of the cards do;
- ``kornli``: KorNLI TSVs (sentence1, sentence2, gold_label) turned into (anchor, entailment,
  contradiction) triplets the way sentence-transformers' NLI example (``training_nli_v2.py``) and
  ko-sentence-transformers' KorNLI loader do: every sentence, as premise and as hypothesis, collects
  its entailed and contradicted partners; one that has both gives two triplets,
  ``[s, entailed, contradicted]`` and ``[entailed', s, contradicted']``, each partner drawn at random.
  Several files (MultiNLI and SNLI) pool into one table, as that loader globs ``*train.ko.tsv``;
- ``triplets``, ``pairs``, ``scored-pairs``: plain TSVs, tab-separated, no header line, 3, 2 and 3
  fields (the last a score in [0, 1]);
- ``dataset``: a table as sentence-transformers' trainer takes a dataset (JSON Lines, Parquet, CSV,
  TSV with a header): (anchor, positive, negative_1 .. negative_n) or (sentence1, sentence2, score),
  a ``score`` or ``label`` column the score, every other column a text in the table's order.

A sampler is an endless stream of batches (lists of example indices) that behaves like what
``old_fit`` iterates: ``sequential`` (file order, a DataLoader without shuffling), ``shuffle`` (a new
permutation every pass, a DataLoader with ``shuffle=True``), ``no_duplicates`` (sentence-transformers'
``NoDuplicatesDataLoader``: no text twice in a batch, compared stripped and lowercased). ``len`` is the
number of batches per pass, which sets ``old_fit``'s epoch length. ``drop_last`` (several ranks) leaves
out a pass's last, smaller batch, so every global batch splits into equal shards.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minisbert.errors import DataFormatError, DataNotFoundError
from minisbert.sts import read_sts


@dataclass
class Examples:
    texts: list[tuple[str, ...]]  # each example's text columns, all examples with the same count
    scores: list[float] | None = None  # scored pairs: the gold similarity in [0, 1]

    def __len__(self) -> int:
        return len(self.texts)

# ---------------------------------------------------------------------------------------------------
# Readers


def read_korsts(path: Path) -> Examples:
    data = read_sts(path)  # scores already divided by 5
    return Examples(list(zip(data.sentences1, data.sentences2)), list(data.scores))


def read_kornli(paths: list[Path], rng: random.Random) -> Examples:
    partners: dict[str, dict[str, dict[str, None]]] = {}  # sentence -> label -> partners (an ordered set)
    for path in paths:
        for line, row in _tsv_rows(path, header=True):
            try:
                s1, s2, label = row["sentence1"].strip(), row["sentence2"].strip(), row["gold_label"]
            except (KeyError, AttributeError):
                raise DataFormatError(f"{path}:{line}: a KorNLI row needs sentence1, sentence2 and "
                                      f"gold_label") from None
            for a, b in ((s1, s2), (s2, s1)):  # each pair read both ways, as the NLI example does
                partners.setdefault(a, {"contradiction": {}, "entailment": {}, "neutral": {}})
                partners[a].setdefault(label, {})[b] = None
    texts = []
    for sentence, by_label in partners.items():
        entailed, contradicted = list(by_label["entailment"]), list(by_label["contradiction"])
        if entailed and contradicted:
            # Partners in file order (the example's random.choice over a set is not reproducible).
            texts.append((sentence, rng.choice(entailed), rng.choice(contradicted)))
            texts.append((rng.choice(entailed), sentence, rng.choice(contradicted)))
    return Examples(texts)


def read_plain(path: Path, fields: int, scored: bool) -> Examples:
    texts, scores = [], []
    for line, row in _tsv_rows(path, header=False):
        if len(row) != fields:
            raise DataFormatError(f"{path}:{line}: {len(row)} tab-separated fields, expected {fields}")
        if scored:
            try:
                score = float(row[-1])
            except ValueError:
                score = math.nan
            if not 0 <= score <= 1:  # NaN fails too
                raise DataFormatError(f"{path}:{line}: score {row[-1]!r} is not a number in [0, 1]")
            scores.append(score)
            row = row[:-1]
        texts.append(tuple(row))
    return Examples(texts, scores if scored else None)


def _tsv_rows(path: Path, header: bool):
    """(line number, row) for each non-empty line: a dict by the header's names, or a list of fields.
    QUOTE_NONE, as KorNLI/KorSTS must be read (their texts hold unbalanced quotes)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            names = next(reader, None) if header else None
            for row in reader:
                if row:
                    yield reader.line_num, dict(zip(names, row)) if header else row
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not UTF-8 text") from None


def read_dataset(path: Path) -> Examples:
    """A table laid out as sentence-transformers' trainer takes a dataset: a column named ``score`` or
    ``label`` is the example's score, every other column a text, in the table's order ((anchor,
    positive, negative_1 .. negative_n), (sentence1, sentence2, score), any names). The table: JSON
    Lines (``.jsonl``, one object a line), Parquet (``.parquet``, the ``pyarrow`` extra), CSV (``.csv``)
    or TSV (``.tsv``, ``.tab``) with a header line. A row with a missing or non-text field, or a score
    that is not a number, is a DataFormatError naming the file and the line (Parquet: the row)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, where = _jsonl_rows(path), "line"
    elif suffix == ".parquet":
        rows, where = _parquet_rows(path), "row"
    elif suffix in (".csv", ".tsv", ".tab"):
        rows, where = _delimited_rows(path, "," if suffix == ".csv" else "\t"), "line"
    else:
        raise DataFormatError(f"{path}: a dataset is .jsonl, .parquet, .csv or .tsv, not {suffix or 'no suffix'}")
    texts, scores, names = [], [], None
    for line, row in rows:
        if names is None:
            names = list(row)
            label = next((n for n in names if n in ("score", "label")), None)
            text_names = [n for n in names if n != label]
            if len(text_names) < 1:
                raise DataFormatError(f"{path}: no text columns (names {names})")
        if list(row) != names:
            raise DataFormatError(f"{path}:{where} {line}: columns {list(row)}, expected {names}")
        fields = [row[n] for n in text_names]
        if not all(isinstance(f, str) for f in fields):
            bad = next(n for n, f in zip(text_names, fields) if not isinstance(f, str))
            raise DataFormatError(f"{path}:{where} {line}: {bad!r} is {row[bad]!r}, not a text")
        texts.append(tuple(fields))
        if label is not None:
            score = row[label]
            try:
                score = float(score) if not isinstance(score, bool) else math.nan
            except (TypeError, ValueError):
                score = math.nan
            if not math.isfinite(score):
                raise DataFormatError(f"{path}:{where} {line}: {label} {row[label]!r} is not a number")
            scores.append(score)
    if names is None:
        raise DataFormatError(f"{path}: no rows")
    return Examples(texts, scores if label is not None else None)


def _jsonl_rows(path: Path):
    import json

    with open(path, encoding="utf-8") as f:
        try:
            for line, text in enumerate(f, 1):
                if text.strip():
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise DataFormatError(f"{path}:line {line}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataFormatError(f"{path}:line {line}: a JSON object per line, got {type(row).__name__}")
                    yield line, row
        except UnicodeDecodeError:
            raise DataFormatError(f"{path}: not UTF-8 text") from None


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from minisbert.errors import MissingDependencyError
        raise MissingDependencyError("reading Parquet needs pyarrow: pip install 'minisbert[train]'") from None
    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist(), 1):
        yield i, row


def _delimited_rows(path: Path, delimiter: str):
    """CSV with quotes; TSV as the shared data is written (no quoting, csv.QUOTE_NONE)."""
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    with open(path, encoding="utf-8", newline="") as f:
        try:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            names = next(reader, None)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(names):
                    raise DataFormatError(f"{path}:line {reader.line_num}: {len(row)} fields, the header has "
                                          f"{len(names)}")
                yield reader.line_num, dict(zip(names, row))
        except UnicodeDecodeError:
            raise DataFormatError(f"{path}: not UTF-8 text") from None


FORMATS = ("korsts", "kornli", "triplets", "pairs", "scored-pairs", "dataset")


def read_examples(paths: list[Path], fmt: str, rng: random.Random) -> Examples:
    """Read ``paths`` (one or more files, concatenated in order) in format ``fmt``."""
    if fmt not in FORMATS:
        raise DataFormatError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    for path in paths:
        if not Path(path).is_file():
            raise DataNotFoundError(f"{path}: no such file")
    if fmt == "kornli":
        return read_kornli(paths, rng)
    if fmt == "dataset":
        parts = [read_dataset(Path(p)) for p in paths]
        if len({len(part.texts[0]) for part in parts}) > 1 or len({part.scores is None for part in parts}) > 1:
            raise DataFormatError(f"{paths}: the files have different columns")
        scored = parts[0].scores is not None
        return Examples([t for part in parts for t in part.texts],
                        [s for part in parts for s in part.scores] if scored else None)
    parts = [read_korsts(p) if fmt == "korsts" else
             read_plain(p, {"triplets": 3, "pairs": 2, "scored-pairs": 3}[fmt], fmt == "scored-pairs") for p in paths]
    scored = fmt in ("korsts", "scored-pairs")
    return Examples([t for part in parts for t in part.texts],
                    [s for part in parts for s in part.scores] if scored else None)


# ---------------------------------------------------------------------------------------------------
# Samplers


class Sampler:
    """Batches of ``batch_size`` example indices, forever; ``len`` batches make one pass over the data."""

    def __init__(self, examples: Examples, batch_size: int, kind: str, rng: random.Random, drop_last: bool = False):
        if kind not in SAMPLERS:
            raise ValueError(f"sampler {kind!r} is not one of {', '.join(SAMPLERS)}")
        self.examples, self.batch_size, self.kind, self.rng = examples, batch_size, kind, rng
        self.drop_last = drop_last  # several ranks: every global batch full, so each rank gets B examples

    def __len__(self) -> int:
        n, b = len(self.examples), self.batch_size
        # A DataLoader keeps the last, smaller batch; NoDuplicatesDataLoader counts full batches only.
        return n // b if self.kind == "no_duplicates" or self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[list[int]]:
        return SAMPLERS[self.kind](self)

    def sequential(self) -> Iterator[list[int]]:
        n, b = len(self.examples), self.batch_size
        while True:
            yield from (list(range(s, min(s + b, n))) for s in range(0, n, b) if not self.drop_last or s + b <= n)

    def shuffle(self) -> Iterator[list[int]]:
        n, b = len(self.examples), self.batch_size
        while True:
            order = list(range(n))
            self.rng.shuffle(order)  # a new permutation each pass, as a DataLoader's RandomSampler
            yield from (order[s: s + b] for s in range(0, n, b) if not self.drop_last or s + b <= n)

    def no_duplicates(self) -> Iterator[list[int]]:
        """NoDuplicatesDataLoader: walk a shuffled order, skip an example whose text is already in the
        batch (skipped examples wait for the next pass), reshuffle at the end and go on filling."""
        order = list(range(len(self.examples)))
        self.rng.shuffle(order)
        pointer = 0
        while True:
            batch, seen, skipped = [], set(), 0
            while len(batch) < self.batch_size:
                i = order[pointer]
                keys = [text.strip().lower() for text in self.examples.texts[i]]
                if not seen.intersection(keys):
                    batch.append(i)
                    seen.update(keys)
                else:
                    skipped += 1
                    if skipped > len(order):  # sentence-transformers would loop forever here
                        raise DataFormatError(f"cannot fill a batch of {self.batch_size} examples without a text twice")
                pointer += 1
                if pointer == len(order):
                    pointer = 0
                    self.rng.shuffle(order)
            yield batch


SAMPLERS = {"sequential": Sampler.sequential, "shuffle": Sampler.shuffle, "no_duplicates": Sampler.no_duplicates}
