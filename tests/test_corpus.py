"""``embed-corpus``'s local engine (minisbert/corpus/): every input format, embeddings equal to
``encode``, ids, bad rows, quantized output, the manifest check, and resuming after a killed run."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, corpus, make_checkpoint, single_thread

from minisbert.corpus import embed_corpus
from minisbert.corpus.job import MANIFEST, CorpusError, CorpusSettings, prepare_output
from minisbert.corpus.readers import plan
from minisbert.encoder import SentenceEncoder
from minisbert.quantize import quantize_embeddings

pa = pytest.importorskip("pyarrow", reason="embed-corpus writes Parquet: pip install pyarrow (the corpus extra)")
import pyarrow.parquet as pq  # noqa: E402

FORMATS = ("jsonl", "parquet", "csv", "tsv", "txt")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("corpus-model"), "roberta", max_seq_length=64)


@pytest.fixture(scope="module")
def encoder(model) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(model)


def texts_for(fmt: str, n: int = 120) -> list[str]:
    """Korean test texts (long passages included), with what each format must carry through: commas,
    quotes and a line break inside a CSV field, quotes in TSV (no quoting there), nothing for .txt."""
    texts = corpus(n)
    if fmt in ("csv", "jsonl", "parquet"):
        texts[3] = '그는 "안녕, 세상"이라고 말했다,\n그리고 떠났다.'
    if fmt == "tsv":
        texts[3] = '"따옴표"로 시작하는 문장, 쉼표도 있다'
    return texts


def write_input(path: Path, texts: list[str], ids: list | None = None) -> Path:
    """``texts`` (and an "id" column) in the format of ``path``'s extension."""
    fmt = path.suffix[1:]
    rows = [{"text": t} if ids is None else {"id": i, "text": t} for t, i in zip(texts, ids or texts)]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=25)  # parts cross row groups
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "tsv":  # no quoting: fields as they are, tab-separated (KorSTS's layout)
        lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def read_output(folder: Path, id_name: str = "id") -> tuple[list, np.ndarray]:
    """(ids, embeddings) of every part file, ordered by part; every id once."""
    table = pq.read_table(sorted(glob.glob(str(folder / "part-*.parquet"))))
    ids = table.column(id_name).to_pylist()
    assert len(set(ids)) == len(ids), "an id appears twice in the output"
    emb = table.column("embedding")
    return ids, np.asarray(emb.combine_chunks().flatten()).reshape(len(ids), emb.type.list_size)


def run(inputs, out, model, encoder, **kw) -> dict:
    engine = {k: kw.pop(k) for k in ("resume", "batch_size", "workers") if k in kw}
    with single_thread():
        return embed_corpus([str(p) for p in inputs], str(out), CorpusSettings(str(model), **kw), encoder=encoder,
                            show_progress=False, **engine)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_equals_encode(fmt, tmp_path, model, encoder):
    texts = texts_for(fmt)
    src = write_input(tmp_path / f"in.{fmt}", texts)
    done = run([src], tmp_path / "out", model, encoder, rows_per_part=50)
    ids, emb = read_output(tmp_path / "out")
    with single_thread():
        ref = encoder.encode(texts)
    assert ids == list(range(len(texts)))
    assert emb.dtype == np.float32 and emb.shape == ref.shape
    # Parts of 50 group the texts differently from one encode call of 120: equal within 1e-6.
    assert np.abs(emb - ref).max() <= 1e-6, np.abs(emb - ref).max()
    assert done["complete"] and done["rows"] == done["rows_written"] == len(texts)
    assert [p["rows"] for p in done["parts"]] == [50, 50, 20]
    assert done["inputs"][0]["format"] == ("text" if fmt == "txt" else fmt)


def test_one_part_is_bitwise_encode(tmp_path, model, encoder):
    """A part is one ``encode`` call: same texts, same batches, the same bits."""
    texts = texts_for("jsonl", 90)
    run([write_input(tmp_path / "in.jsonl", texts)], tmp_path / "out", model, encoder, rows_per_part=1000,
        batch_size=8)
    with single_thread():
        ref = encoder.encode(texts, batch_size=8)
    assert np.array_equal(read_output(tmp_path / "out")[1], ref)


def test_float16_model_writes_float32_as_the_manifest_says(tmp_path, model):
    """encode gives a float16 model's embeddings in float16 (as sentence-transformers); the parts and the
    manifest hold float32 whatever the model's dtype."""
    texts = texts_for("jsonl", 20)
    half = SentenceEncoder.from_pretrained(model, dtype=torch.float16)
    run([write_input(tmp_path / "in.jsonl", texts)], tmp_path / "out", model, half, dtype="float16")
    with single_thread():
        ref = half.encode(texts)
    assert ref.dtype == np.float16
    _, emb = read_output(tmp_path / "out")
    assert emb.dtype == np.float32 and np.array_equal(emb, ref.astype(np.float32))
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["embedding"]["type"] == "float32"


def test_worker_processes_write_the_same_parts(tmp_path, model, encoder):
    """--workers 2: two spawned processes of one thread each, each writing whole parts: the same bits
    as this process on one thread; a bad row in a worker stops the job with its message."""
    texts = texts_for("jsonl", 100)
    src = write_input(tmp_path / "in.jsonl", texts)
    run([src], tmp_path / "one", model, encoder, rows_per_part=30)
    done = run([src], tmp_path / "two", model, encoder, rows_per_part=30, workers=2)
    assert done["complete"] and done["rows_written"] == 100
    ids, emb = read_output(tmp_path / "two")
    assert ids == list(range(100)) and np.array_equal(emb, read_output(tmp_path / "one")[1])
    bad = write_bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match=r"bad\.jsonl: row 1 \(line 2\): 'text' is 5, not a string"):
        run([src, bad], tmp_path / "three", model, encoder, rows_per_part=30, workers=2)


def test_several_inputs_positions_and_id_columns(tmp_path, model, encoder):
    a, b = texts_for("jsonl", 30), texts_for("csv", 40)[::-1]
    inputs = [write_input(tmp_path / "a.jsonl", a), write_input(tmp_path / "b.csv", b)]
    run(inputs, tmp_path / "pos", model, encoder, rows_per_part=16)
    ids, emb = read_output(tmp_path / "pos")
    assert ids == list(range(70))  # positions run on through the second file
    with single_thread():
        ref = encoder.encode(a + b)
    assert np.abs(emb - ref).max() <= 1e-6
    # An id column: JSON integers stay integers, CSV fields and JSON strings are strings.
    src = write_input(tmp_path / "ints.jsonl", a, ids=[1000 + i for i in range(30)])
    run([src], tmp_path / "ints", model, encoder, id_column="id")
    assert read_output(tmp_path / "ints")[0] == [1000 + i for i in range(30)]
    assert pq.read_schema(tmp_path / "ints" / "part-00000-000000.parquet").field("id").type == pa.int64()
    src = write_input(tmp_path / "keys.csv", b, ids=[f"doc-{i}" for i in range(40)])
    run([src], tmp_path / "keys", model, encoder, id_column="id")
    assert read_output(tmp_path / "keys")[0] == [f"doc-{i}" for i in range(40)]
    with pytest.raises(CorpusError, match="different types across the inputs"):
        plan([str(tmp_path / "ints.jsonl"), str(tmp_path / "keys.csv")], CorpusSettings("m", id_column="id"), "x")


def write_bad_jsonl(path: Path) -> Path:
    good = json.dumps({"text": "좋은 문장"}, ensure_ascii=False).encode()
    lines = [good, b'{"text": 5}', good, b"{not json", b"", b'{"text": null}', b'["text"]', b'{"other": "x"}',
             '{"text": "깨진'.encode() + b"\xff\xfe" + b'"}', good]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_stop_the_job_naming_file_and_row(tmp_path, model, encoder):
    src = write_bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match=r"bad\.jsonl: row 1 \(line 2\): 'text' is 5, not a string.*--skip-bad-rows"):
        run([src], tmp_path / "out", model, encoder)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes("text,n\n좋다,1\n너무,많은,필드\n".encode() + b"\xff,2\n")
    with pytest.raises(CorpusError, match=r"bad\.csv: row 1 \(line 3\): 3 fields, the header has 2"):
        run([bad_csv], tmp_path / "out2", model, encoder)
    bad_txt = tmp_path / "bad.txt"
    bad_txt.write_bytes("첫 줄\n".encode() + b"\xc3\x28\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: row 1 \(line 2\): not UTF-8"):
        run([bad_txt], tmp_path / "out3", model, encoder)
    bad_parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["가", None, "나"]}), bad_parquet)
    with pytest.raises(CorpusError, match=r"bad\.parquet: row 1: 'text' is null"):
        run([bad_parquet], tmp_path / "out4", model, encoder)


def test_skip_bad_rows_lists_them_in_the_manifest(tmp_path, model, encoder):
    src = write_bad_jsonl(tmp_path / "bad.jsonl")
    done = run([src], tmp_path / "out", model, encoder, skip_bad_rows=True, rows_per_part=4)
    ids, emb = read_output(tmp_path / "out")
    assert ids == [0, 2, 8]  # the blank line is no row; bad rows keep their positions
    assert [(b["row"], b["line"]) for b in done["bad_rows"]] == [(1, 2), (3, 4), (4, 6), (5, 7), (6, 8), (7, 9)]
    reasons = " | ".join(b["reason"] for b in done["bad_rows"])
    for what in ("is 5, not a string", "not valid JSON", "is null, not a string", "a JSON list, not an object",
                 "no 'text' field", "not UTF-8"):
        assert what in reasons
    on_disk = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert on_disk["bad_rows"] == done["bad_rows"] and on_disk["rows"] == 9 and on_disk["rows_written"] == 3


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_quantized_output(precision, tmp_path, model, encoder):
    texts = texts_for("jsonl", 80)
    done = run([write_input(tmp_path / "in.jsonl", texts)], tmp_path / "out", model, encoder,
               precision=precision, rows_per_part=1000)
    _, emb = read_output(tmp_path / "out")
    with single_thread():
        ref = encoder.encode(texts)
    ranges = None
    if precision.endswith("int8"):  # one set of ranges for the corpus, from its first rows, kept in the manifest
        ranges = np.array(done["quantization_ranges"], dtype=np.float32)
        assert np.array_equal(ranges, np.stack([ref.min(0), ref.max(0)]))
    expected = quantize_embeddings(ref, precision, ranges=ranges)
    assert emb.dtype == expected.dtype and np.array_equal(emb, expected)
    assert done["embedding"] == {"column": "embedding", "type": expected.dtype.name, "width": expected.shape[1]}


def test_resume_refuses_other_settings_or_inputs(tmp_path, model, encoder):
    src = write_input(tmp_path / "in.jsonl", texts_for("jsonl", 20))
    run([src], tmp_path / "out", model, encoder, rows_per_part=8)
    settings = CorpusSettings(str(model), rows_per_part=8)
    with pytest.raises(CorpusError, match="already holds a job.*--resume"):
        prepare_output(plan([str(src)], settings, str(tmp_path / "out")), resume=False)
    with pytest.raises(CorpusError, match="made with precision='float32', this run has precision='int8'"):
        run([src], tmp_path / "out", model, encoder, rows_per_part=8, precision="int8", resume=True)
    with pytest.raises(CorpusError, match="made with rows_per_part=8, this run has rows_per_part=9"):
        run([src], tmp_path / "out", model, encoder, rows_per_part=9, resume=True)
    with src.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "새 줄"}) + "\n")
    with pytest.raises(CorpusError, match=r"inputs are not the ones .*in\.jsonl \(size"):
        run([src], tmp_path / "out", model, encoder, rows_per_part=8, resume=True)
    # The same settings and inputs resume (nothing left to do here).
    other = write_input(tmp_path / "other.jsonl", texts_for("jsonl", 20))
    run([other], tmp_path / "again", model, encoder, rows_per_part=8)
    assert run([other], tmp_path / "again", model, encoder, rows_per_part=8, resume=True)["complete"]


def test_progress_bar_shows_rows_per_second(tmp_path, model, encoder, capsys):
    src = write_input(tmp_path / "in.txt", texts_for("txt", 40))
    with single_thread():
        embed_corpus([str(src)], str(tmp_path / "out"), CorpusSettings(str(model), rows_per_part=10), encoder=encoder,
                     show_progress=True)
    err = capsys.readouterr().err
    assert "embed-corpus" in err and "40/40" in err and "row/s" in err


def cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minisbert", "embed-corpus", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_resume_after_a_killed_run_redoes_only_missing_parts(tmp_path, model, encoder):
    """The CLI killed (SIGKILL) mid-run: some parts whole, none half-written under its final name;
    --resume writes only the missing parts, and the result is what one uninterrupted run gives."""
    texts = corpus(400) * 5
    src = write_input(tmp_path / "in.jsonl", texts)
    out = tmp_path / "out"
    proc = cli("--model", model, "--input", src, "--output", out, "--rows-per-part", 20, "--batch-size", 4)
    total = len(texts) // 20
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert 3 <= len(survivors) < total, f"the kill came too late: {len(survivors)} of {total} parts"
    assert json.loads((out / MANIFEST).read_text())["complete"] is False
    for name in survivors:  # every part file there is whole
        assert pq.read_metadata(out / name).num_rows == 20

    proc = cli("--model", model, "--input", src, "--output", out, "--rows-per-part", 20, "--batch-size", 4,
               "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    for name, stat in survivors.items():  # not written again
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat
    assert not list(out.glob(".*.tmp"))
    ids, emb = read_output(out)
    assert ids == list(range(len(texts)))
    run([src], tmp_path / "whole", model, encoder, rows_per_part=20, batch_size=4)
    assert np.array_equal(emb, read_output(tmp_path / "whole")[1])
    assert json.loads((out / MANIFEST).read_text())["complete"] is True


def test_cli_checks_inputs_and_folder_before_loading(tmp_path, capsys):
    """Wrong inputs or a used folder are one-line errors before the model (here: none) is looked up."""
    from minisbert.cli import main

    (tmp_path / "a.xml").write_text("<x/>")
    assert main(["embed-corpus", "--model", "no-such-model", "--input", str(tmp_path / "a.xml"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "a.xml: unknown input format '.xml'" in capsys.readouterr().err
    assert main(["embed-corpus", "--model", "no-such-model", "--input", str(tmp_path / "none.jsonl"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    src = write_input(tmp_path / "a.csv", ["가", "나"])
    assert main(["embed-corpus", "--model", "no-such-model", "--input", str(src), "--text-column", "body",
                 "--output", str(tmp_path / "out")]) == 2
    assert "a.csv: no column 'body' (it has 'text')" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "part-00000-000000.parquet").write_bytes(b"")
    assert main(["embed-corpus", "--model", "no-such-model", "--input", str(src), "--output",
                 str(tmp_path / "used")]) == 2
    assert "holds part files but no _manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_quantize_equals_sentence_transformers(precision):
    from sentence_transformers.quantization import quantize_embeddings as st_quantize

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 36)).astype(np.float32)
    emb[:, 3] = 0.25  # a zero-width dimension
    calibration = rng.normal(size=(20, 36)).astype(np.float32)
    ranges = np.stack([calibration.min(0), calibration.max(0)])  # narrower: values outside are clipped
    for r in (None, ranges):
        ours = quantize_embeddings(emb, precision, ranges=r)
        theirs = st_quantize(emb, precision, ranges=r)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (precision, r is None)
