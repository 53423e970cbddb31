"""STS evaluation: the model cards' KorSTS tables, computed the way sentence-transformers computes them.

``python -m minisbert eval-sts --model ko-sroberta-multitask --data korsts-test`` prints the 8 figures
of the cards (cosine, Euclidean, Manhattan and dot similarity; Pearson and Spearman of each) x 100.

What makes the figures equal to ``EmbeddingSimilarityEvaluator`` (sentence-transformers 6.2):
- gold = score / 5, as its STS examples build them (correlations ignore the scale anyway);
- each column is encoded on its own, not deduplicated, not normalized (``convert_to_numpy=True``);
- similarities are float32 torch ops like ``util.pairwise_*``: euclidean and manhattan are *negative*
  distances, cosine normalizes with ``F.normalize`` (eps 1e-12). Keeping float32 here matters: it
  decides which similarities tie, and Spearman is sensitive to ties;
- Pearson and Spearman in float64, Spearman = Pearson of average ranks (scipy's ``rankdata``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minisbert.checks import command_line_int
from minisbert.encoder import SentenceEncoder
from minisbert.errors import DataFormatError, DataNotFoundError, MinisbertError
from minisbert.io.files import write_atomically
from minisbert.io.hub import short_names

METRICS = ["cosine_pearson", "cosine_spearman", "euclidean_pearson", "euclidean_spearman",
           "manhattan_pearson", "manhattan_spearman", "dot_pearson", "dot_spearman"]

# Short name -> (path inside the data cache, public URL). The cache layout mirrors the data sets'
# own folders, so MINISBERT_DATA may point at any folder that already holds ``korsts/sts-test.tsv``.
DATASETS = {
    "korsts-test": ("korsts/sts-test.tsv",
                    "https://raw.githubusercontent.com/kakaobrain/kor-nlu-datasets/master/KorSTS/sts-test.tsv"),
    "korsts-dev": ("korsts/sts-dev.tsv",
                   "https://raw.githubusercontent.com/kakaobrain/kor-nlu-datasets/master/KorSTS/sts-dev.tsv"),
    "klue-sts-dev": ("klue-sts/klue-sts-v1.1_dev.json",
                     ("https://raw.githubusercontent.com/KLUE-benchmark/KLUE/main/klue_benchmark/"
                      "klue-sts-v1.1/klue-sts-v1.1_dev.json")),
}
_TRUE = {"1", "true", "yes", "on"}  # the values huggingface_hub accepts for HF_HUB_OFFLINE

@dataclass
class StsData:
    """Sentence pairs with gold similarities already divided by 5."""
    sentences1: list[str] = field(default_factory=list)
    sentences2: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, sentence1: str, sentence2: str, score: float) -> None:
        self.sentences1.append(sentence1)
        self.sentences2.append(sentence2)
        self.scores.append(score / 5.0)


# ---------------------------------------------------------------- finding the file

def data_dir() -> Path:
    """The data cache: ``$MINISBERT_DATA``, else ``~/.cache/minisbert/data``."""
    return Path(os.environ.get("MINISBERT_DATA") or Path.home() / ".cache" / "minisbert" / "data").expanduser()


def resolve_data(spec: str) -> Path:
    """A data file from a path, or from a short name (cached, else downloaded once into the cache)."""
    path = Path(spec).expanduser()
    if path.is_file():  # an existing file always wins over a short name
        return path
    if spec not in DATASETS:
        raise DataNotFoundError(f"{spec}: no such file, and not one of the data set names {', '.join(DATASETS)}")
    relpath, url = DATASETS[spec]
    target = data_dir() / relpath
    if target.is_file():
        return target
    hint = f"download {url} and save it as {target}, or pass --data PATH"
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("MINISBERT_OFFLINE", "HF_HUB_OFFLINE")):
        raise DataNotFoundError(f"{spec} is not in the cache and MINISBERT_OFFLINE/HF_HUB_OFFLINE forbid "
                                f"downloads: {hint}")
    _log(f"downloading {url} -> {target}")
    try:
        _download(url, target)
    except OSError as err:  # URLError, HTTPError and timeouts are all OSErrors
        raise DataNotFoundError(f"could not download {spec} ({err}): {hint}") from err
    return target


def _download(url: str, target: Path, timeout: float = 60.0) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted download never leaves a truncated "cached" file.
    with urllib.request.urlopen(url, timeout=timeout) as response:
        write_atomically(target, lambda out: out.write(response.read()))


# ---------------------------------------------------------------- reading it

def read_sts(path: str | os.PathLike) -> StsData:
    """Read KorSTS TSV, KLUE-STS JSON, or a CSV/TSV/JSONL with ``sentence1``, ``sentence2``, ``score``.

    The format comes from the extension, or for other extensions from the first line.
    Raises DataFormatError naming the file and line of the first bad record.
    """
    path = Path(path)
    try:  # -sig: spreadsheet exports start with a BOM; newline="": the csv module splits the lines itself
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        line = path.read_bytes().count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text") from None
    head = text.lstrip()
    first_line = head.split("\n", 1)[0]
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".ndjson") or (suffix not in (".tsv", ".csv") and head.startswith(("[", "{"))):
        if head.startswith("["):
            data = _read_json_list(text, path)
        elif head.startswith("{"):
            data = _read_json_lines(text, path)
        else:
            raise DataFormatError(f"{path}:1: expected a JSON list of objects or one JSON object per line")
    elif suffix == ".tsv" or (suffix != ".csv" and "\t" in first_line):
        # QUOTE_NONE: KorSTS sentences contain bare '"'; the default quoting merges rows and loses pairs.
        data = _read_delimited(text, path, delimiter="\t", quoting=csv.QUOTE_NONE)
    elif suffix == ".csv" or "," in first_line:
        data = _read_delimited(text, path, delimiter=",", quoting=csv.QUOTE_MINIMAL)
    else:
        raise DataFormatError(f"{path}:1: unknown data format: expected .tsv/.csv with a header naming "
                              f"sentence1, sentence2 and score, KLUE-STS .json, or .jsonl")
    if not data:
        raise DataFormatError(f"{path}:1: no sentence pairs in the file")
    return data


def _read_delimited(text: str, path: Path, delimiter: str, quoting: int) -> StsData:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in ("sentence1", "sentence2", "score") if name not in header]
        if missing:
            raise DataFormatError(f"{path}:1: the header lacks {', '.join(missing)}; expected the KorSTS columns "
                                  f"(genre filename year id score sentence1 sentence2) or sentence1, sentence2, score")
        col1, col2, col_score = header.index("sentence1"), header.index("sentence2"), header.index("score")
        data = StsData()
        for row in reader:
            if not row:  # a blank line holds no pair
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise DataFormatError(f"{where}: expected {len(header)} fields like the header, found {len(row)}")
            data.add(row[col1], row[col2], _parse_score(row[col_score], where))
    except csv.Error as err:
        raise DataFormatError(f"{path}:{reader.line_num}: {err}") from None
    return data


def _read_json_list(text: str, path: Path) -> StsData:
    # Decode one object at a time so a bad record can be reported with its line (KLUE's files are indented).
    decoder, skip_ws = json.JSONDecoder(), re.compile(r"\s*").match
    data, line, counted = StsData(), 1, 0
    pos = skip_ws(text, text.index("[") + 1).end()
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos  # line of the record starting at pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        data.add(*_pair_from_record(record, f"{path}:{line}"))
        pos = skip_ws(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = skip_ws(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise DataFormatError(f"{path}:{_line_at(text, pos)}: expected ',' or ']' after a record")
    if pos >= len(text):
        raise DataFormatError(f"{path}:{_line_at(text, pos)}: the JSON list is not closed with ']'")
    return data


def _read_json_lines(text: str, path: Path) -> StsData:
    data = StsData()
    # split("\n"), not splitlines(): JSON strings may hold U+2028 or U+0085, which splitlines() breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{number}: invalid JSON: {err.msg}") from None
        data.add(*_pair_from_record(record, f"{path}:{number}"))
    return data


def _pair_from_record(record: object, where: str) -> tuple[str, str, float]:
    """``sentence1``, ``sentence2`` and ``score`` (generic) or ``labels.label`` (KLUE-STS, 0-5)."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object with sentence1, sentence2 and score, found "
                              f"{type(record).__name__}")
    labels = record.get("labels")
    if "score" in record:
        raw = record["score"]
    elif isinstance(labels, dict) and "label" in labels:
        raw = labels["label"]
    else:
        raise DataFormatError(f"{where}: the record has neither 'score' nor 'labels.label'")
    for key in ("sentence1", "sentence2"):
        if not isinstance(record.get(key), str):
            raise DataFormatError(f"{where}: '{key}' is missing or not a string")
    return record["sentence1"], record["sentence2"], _parse_score(raw, where)


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_score(raw: object, where: str) -> float:
    try:
        score = float("nan" if isinstance(raw, bool) else raw)  # float(True) is 1.0, but no similarity score
    except (TypeError, ValueError):
        score = float("nan")
    if not math.isfinite(score):
        raise DataFormatError(f"{where}: score {raw!r} is not a finite number")
    return score


# ---------------------------------------------------------------- metrics (numpy, float64)

def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (scipy's ``rankdata(method="average")``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    run_start = np.flatnonzero(starts_run)                      # 0-based first position of each run of ties
    run_end = np.concatenate([run_start[1:], [len(values)]])    # exclusive end
    mean_rank = (run_start + 1 + run_end) / 2.0                 # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(starts_run) - 1]
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r as scipy computes it: centre, scale each side to unit length, dot; NaN if one is constant."""
    xm = np.asarray(x, dtype=np.float64) - np.mean(x, dtype=np.float64)
    ym = np.asarray(y, dtype=np.float64) - np.mean(y, dtype=np.float64)
    norm_x, norm_y = np.linalg.norm(xm), np.linalg.norm(ym)
    if norm_x == 0 or norm_y == 0:
        return float("nan")
    return float(np.clip(np.dot(xm / norm_x, ym / norm_y), -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


def pairwise_similarities(emb1: np.ndarray, emb2: np.ndarray) -> dict[str, np.ndarray]:
    """Row-wise cosine, negative Euclidean, negative Manhattan and dot similarity, as ``util.pairwise_*``."""
    a, b = torch.from_numpy(np.asarray(emb1)), torch.from_numpy(np.asarray(emb2))
    if a.dtype in (torch.float16, torch.bfloat16):  # upcast like sentence-transformers, to avoid spurious ties
        a, b = a.float(), b.float()
    sims = {
        "cosine": (F.normalize(a, p=2, dim=-1) * F.normalize(b, p=2, dim=-1)).sum(dim=-1),
        "euclidean": -torch.linalg.vector_norm(a - b, dim=-1),
        "manhattan": -torch.sum(torch.abs(a - b), dim=-1),
        "dot": (a * b).sum(dim=-1),
    }
    return {name: sim.numpy() for name, sim in sims.items()}


def evaluate_sts(encoder, sentences1: list[str], sentences2: list[str], scores: list[float],
                 batch_size: int = 32) -> dict[str, float | int]:
    """The 8 figures of sentence-transformers' ``EmbeddingSimilarityEvaluator`` (fractions) and ``pairs``.

    ``encoder`` is anything with ``encode(list[str], batch_size=..., convert_to_numpy=True) -> (N, D)``;
    ``scores`` are the gold similarities as given (the readers here already divide by 5).
    """
    if not len(sentences1) == len(sentences2) == len(scores):
        raise ValueError(f"{len(sentences1)} first sentences, {len(sentences2)} second, {len(scores)} scores")
    if len(scores) < 2:
        raise ValueError("a correlation needs at least 2 pairs")
    # Each column on its own and not deduplicated, as the evaluator does: an encoder whose last bits depend on
    # the batch's padding then sees the same batches there and here (for equal batch sizes).
    emb1 = encoder.encode(list(sentences1), batch_size=batch_size, convert_to_numpy=True)
    emb2 = encoder.encode(list(sentences2), batch_size=batch_size, convert_to_numpy=True)
    gold = np.asarray(scores, dtype=np.float64)
    results: dict[str, float | int] = {}
    for name, sim in pairwise_similarities(emb1, emb2).items():
        results[f"{name}_pearson"] = pearson(gold, sim)
        results[f"{name}_spearman"] = spearman(gold, sim)
    results["pairs"] = len(scores)
    return results


# ---------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``minisbert eval-sts``."""
    parser.add_argument("--model", action="append", required=True, metavar="MODEL",
                        help="model folder, short name or hub id; repeat to compare models")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="KorSTS .tsv, KLUE-STS .json, or .csv/.tsv/.jsonl with sentence1, sentence2, score; "
                             f"or one of {', '.join(DATASETS)} (downloaded once into $MINISBERT_DATA, "
                             "default ~/.cache/minisbert/data)")
    parser.add_argument("--batch-size", type=command_line_int(), default=32, metavar="N",
                        help="sentences per forward")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object of fractions (0-1) instead of the table of figures x 100")


def run(args: argparse.Namespace) -> int:
    """Evaluate each ``--model`` on ``--data``; print the table or JSON on stdout, logs on stderr.

    Errors (DataFormatError, DataNotFoundError, the encoder's) propagate to the CLI, which prints them.
    """
    models = list(dict.fromkeys(args.model))  # a repeated model would collide in the JSON object
    path = resolve_data(args.data)
    data = read_sts(path)
    _log(f"{path}: {len(data)} pairs")
    results: dict[str, dict] = {}
    # stdout carries only the result: anything a library prints on the way goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        for model in models:
            start = time.perf_counter()
            encoder = SentenceEncoder.from_pretrained(model, device=args.device)
            results[model] = evaluate_sts(encoder, data.sentences1, data.sentences2, data.scores,
                                          batch_size=args.batch_size)
            _log(f"{model}: {len(data)} pairs in {time.perf_counter() - start:.1f} s")
    if args.json:
        print(json.dumps(results[models[0]] if len(models) == 1 else results))
    else:
        print(format_table(results))
    return 0


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table of the figures x 100, each model followed by its card's row when the manifest has one."""
    headers = ["model", "cos P", "cos S", "euc P", "euc S", "man P", "man S", "dot P", "dot S", "pairs"]
    rows = []
    for model, figures in results.items():
        rows.append([model, *(f"{100 * figures[key]:.2f}" for key in METRICS), str(figures["pairs"])])
        card = card_figures(model)
        if card is not None:
            label, published = card
            rows.append([f"  card: {label}", *(_card_cell(published.get(key)) for key in METRICS), ""])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    # Model names left-aligned, figures right-aligned; in Markdown a ':' at the right end of the rule says so.
    lines = ["| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) + " |" for row in [headers, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def card_figures(model: str) -> tuple[str, dict] | None:
    """(label, KorSTS-test figures x 100) published on the model's card, from the weights manifest if any."""
    try:
        entries = list(short_names().values())
    except (MinisbertError, KeyError, TypeError):  # a manifest we cannot read: no card row
        return None
    # A folder named like the short name (e.g. weights/ko-sroberta-multitask) is that model too.
    asked = {model, Path(model).name}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("card_korsts"), dict):
            continue
        hub_id = str(entry.get("hub_id", ""))
        if asked & {entry.get("name"), hub_id, hub_id.rsplit("/", 1)[-1]}:
            return hub_id or str(entry.get("name")), entry["card_korsts"]
    return None


def _card_cell(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _log(message: str) -> None:
    print(message, file=sys.stderr)
