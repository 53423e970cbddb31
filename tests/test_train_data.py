"""Training tables as sentence-transformers' trainer datasets lay them out (``format: dataset``): JSON
Lines, Parquet, CSV and TSV; a ``score``/``label`` column is the score, the others texts in order; bad
rows name the file and the line; the ``no_duplicates`` batches for in-batch negatives."""

from __future__ import annotations

import json
import random

import pytest

from minisbert import train
from minisbert.errors import DataFormatError
from minisbert.train.data import Examples, Sampler, read_examples

ROWS = [{"anchor": "a1", "positive": "p1", "negative_1": "n1", "negative_2": "m1"},
        {"anchor": "a2, with a comma", "positive": 'p2 "quoted"', "negative_1": "n2", "negative_2": "m2"}]


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv
        with open(path, "w", newline="", encoding="utf-8") as f:
            delimiter = "," if kind == "csv" else "\t"
            writer = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if kind == "csv" else csv.QUOTE_NONE,
                                escapechar=None if kind == "csv" else "\\")
            writer.writerow(rows[0].keys())
            writer.writerows([list(r.values()) for r in rows])
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "tsv"])
def test_dataset_tables(tmp_path, kind):
    rows = ROWS if kind != "tsv" else [dict(r, positive=r["positive"].replace('"', "")) for r in ROWS]
    tuples = read_examples([write(tmp_path / f"t.{kind}", rows, kind)], "dataset", random.Random(0))
    assert tuples.texts == [tuple(r.values()) for r in rows] and tuples.scores is None
    scored = [{"sentence1": "s", "sentence2": "t", "score": 0.25}, {"sentence1": "u", "sentence2": "v", "score": 4}]
    pairs = read_examples([write(tmp_path / f"s.{kind}", scored, kind)], "dataset", random.Random(0))
    assert pairs.texts == [("s", "t"), ("u", "v")] and pairs.scores == [0.25, 4.0]


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"anchor": "a", "positive": "p"}\n\n{"anchor": "a", "positive": 3}\n',
     r"bad.jsonl:line 3: 'positive' is 3, not a text"),
    ("bad.jsonl", '{"anchor": "a", "positive": "p"}\n{"anchor": "a"}\n',
     r"bad.jsonl:line 2: columns \['anchor'\], expected"),
    ("bad.jsonl", '{"anchor": "a", "positive": "p"}\nnot json\n', r"bad.jsonl:line 2: not JSON"),
    ("bad.csv", "sentence1,sentence2,score\na,b,0.5\nc,d,high\n", r"bad.csv:line 3: score 'high' is not a number"),
    ("bad.csv", "sentence1,sentence2,score\na,b\n", r"bad.csv:line 2: 2 fields, the header has 3"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_examples([bad], "dataset", random.Random(0))


def test_unknown_table_suffix_is_refused(tmp_path):
    with pytest.raises(DataFormatError, match=r"a dataset is .jsonl"):
        read_examples([write(tmp_path / "x.txt", ROWS, "tsv")], "dataset", random.Random(0))


def test_dataset_columns_checked_against_the_loss(tmp_path):
    """A scored table for MNR is refused once read, naming the file, before any training step."""
    from minisbert.train import loop

    data = write(tmp_path / "s.jsonl", [{"sentence1": "s", "sentence2": "t", "score": 0.5}], "jsonl")
    rec = train.parse_recipe({"objectives": [{"data": str(data), "format": "dataset",
                                              "loss": "MultipleNegativesRankingLoss", "batch_size": 1}], "fit": {}})
    with pytest.raises(train.RecipeError, match=r"s.jsonl gives 2 texts and a score per example; "
                                                r"MultipleNegativesRankingLoss takes 2 or more texts and no score"):
        loop.build_tasks(rec, random.Random(0))


def test_drop_last_for_several_ranks():
    """Several ranks: a global batch is always full (each rank gets its B); one process keeps the remainder."""
    examples = Examples([(str(i), str(i)) for i in range(10)])
    assert len(Sampler(examples, 4, "sequential", random.Random(0))) == 3
    dropped = Sampler(examples, 4, "sequential", random.Random(0), drop_last=True)
    stream = iter(dropped)
    assert len(dropped) == 2 and [next(stream) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    shuffled = iter(Sampler(examples, 4, "shuffle", random.Random(0), drop_last=True))
    assert all(len(next(shuffled)) == 4 for _ in range(6))
