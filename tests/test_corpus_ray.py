"""``embed-corpus --engine ray`` and ``minisbert.corpus.ray_engine.Embedder`` on a local Ray instance of 2 CPUs,
started once for this file: the same files as the local engine, a killed actor, resuming, bad rows,
the CLI joining the instance by address, and Embedder inside read_parquet -> map_batches -> write_parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, corpus, make_checkpoint, single_thread
from test_corpus import read_output, run, texts_for, write_bad_jsonl, write_input

from minisbert.corpus.job import MANIFEST, CorpusError, CorpusSettings
from minisbert.encoder import SentenceEncoder

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data]: pip install 'minisbert[ray]'")
ray_engine = pytest.importorskip("minisbert.corpus.ray_engine")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    """One local Ray instance for the test session (starting one takes 10-30 s on 2 shared cores). Its
    workers import this checkout's minisbert (PYTHONPATH), whatever the environment has installed."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get(
                 "PYTHONPATH")])), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ray-model"), "roberta", max_seq_length=64)


@pytest.fixture(scope="module")
def encoder(model) -> SentenceEncoder:
    return SentenceEncoder.from_pretrained(model)


def run_ray(inputs, out, model, **kw) -> dict:
    engine = {k: kw.pop(k) for k in ("resume", "batch_size", "workers") if k in kw}
    return ray_engine.embed_corpus([str(p) for p in inputs], str(out), CorpusSettings(str(model), **kw), threads=1,
                                 show_progress=False, **{"workers": 2, **engine})


def test_ray_resumes_a_local_run_with_the_same_bits(cluster, tmp_path, model, encoder):
    """Parts missing from a local engine's folder, written by a resumed Ray run (two actors): only
    those parts are written, bit for bit the local engine's (both run one thread)."""
    inputs = [write_input(tmp_path / "a.jsonl", texts_for("jsonl", 70)),
              write_input(tmp_path / "b.parquet", texts_for("parquet", 50)),
              write_input(tmp_path / "c.csv", texts_for("csv", 30))]
    run(inputs, tmp_path / "out", model, encoder, rows_per_part=16)
    local_ids, local_emb = read_output(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    before = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in names}
    gone = [names[2], names[6], names[10]]  # one part of each input
    for name in gone:
        (tmp_path / "out" / name).unlink()
    done = run_ray(inputs, tmp_path / "out", model, rows_per_part=16, resume=True)
    after = {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in names}
    assert [n for n in names if after[n] != before[n]] == gone
    ids, emb = read_output(tmp_path / "out")
    assert ids == local_ids == list(range(150))
    assert np.array_equal(emb, local_emb)
    assert done["complete"] and done["rows_written"] == 150 and len(done["parts"]) == 5 + 4 + 2


def worker_pids() -> set[int]:
    """Processes of the engine's actors (Ray titles them after the callable class)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"PartWorker" in cmdline:
                pids.add(int(entry))
    return pids


@pytest.mark.slow
def test_killed_actor_still_gives_every_row_once(cluster, tmp_path, model, encoder):
    """SIGKILL one of the two actors mid-run: Ray restarts it and retries its part; the output is
    complete, every id once, equal to the local engine's."""
    texts = corpus(300) * 4
    src = write_input(tmp_path / "in.jsonl", texts)
    out = tmp_path / "out"
    total = len(texts) // 20
    result, killed = {}, {}

    def job():
        try:
            result["done"] = run_ray([src], out, model, rows_per_part=20, batch_size=4)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            result["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        pids = worker_pids()
        written = len(list(out.glob("part-*.parquet")))
        if written >= 2 and pids:
            killed["pid"], killed["written"] = min(pids), written
            os.kill(killed["pid"], signal.SIGKILL)
            break
        time.sleep(0.01)
    thread.join(600)
    assert "error" not in result, result.get("error")
    assert killed and killed["written"] < total, f"no actor killed mid-run: {killed}, {total} parts"
    ids, emb = read_output(out)
    assert ids == list(range(len(texts)))
    run([src], tmp_path / "local", model, encoder, rows_per_part=20, batch_size=4)
    assert np.array_equal(emb, read_output(tmp_path / "local")[1])
    assert result["done"]["complete"]


def test_bad_row_error_reaches_the_driver(cluster, tmp_path, model):
    src = write_bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match=r"bad\.jsonl: row 1 \(line 2\): 'text' is 5, not a string"):
        run_ray([src], tmp_path / "out", model, workers=1)


def test_cli_joins_the_cluster_by_address(cluster, tmp_path, model, encoder):
    texts = texts_for("txt", 60)
    src = write_input(tmp_path / "in.txt", texts)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "minisbert", "embed-corpus", "--model", str(model), "--input",
                           str(src), "--output", str(tmp_path / "out"), "--engine", "ray", "--workers", "2",
                           "--threads", "1", "--ray-address", cluster, "--rows-per-part", "25", "--precision",
                           "uint8", "--normalize"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 60 embeddings of dimension 64 in 3 parts" in proc.stderr
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["settings"]["precision"] == "uint8" and manifest["settings"]["normalize"] is True
    run([src], tmp_path / "local", model, encoder, rows_per_part=25, precision="uint8", normalize=True)
    assert np.array_equal(read_output(tmp_path / "out")[1], read_output(tmp_path / "local")[1])


def test_embedder_in_your_own_pipeline(cluster, tmp_path, model, encoder):
    """read_parquet -> map_batches(Embedder) -> write_parquet: every row, its columns kept, an embedding
    equal to encode's (within 1e-6: Ray's batches group the texts differently)."""
    texts = texts_for("parquet", 90)
    pq.write_table(pa.table({"doc": [f"d{i}" for i in range(90)], "text": texts}), tmp_path / "in.parquet")
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet"))
    # One actor of one CPU (one file is one block): the read and write tasks need the other CPU, or
    # they would wait forever for actors that hold every CPU.
    ds = ds.map_batches(ray_engine.Embedder, fn_constructor_kwargs={"model": str(model), "threads": 1},
                        batch_size=32, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                        num_cpus=1)
    ds.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(str(tmp_path / "out"))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    order = np.argsort([int(d[1:]) for d in table.column("doc").to_pylist()])
    assert [table.column("doc").to_pylist()[i] for i in order] == [f"d{i}" for i in range(90)]
    assert [table.column("text").to_pylist()[i] for i in order] == texts
    emb = np.stack([np.asarray(v, dtype=np.float32) for v in table.column("embedding").to_pylist()])[order]
    with single_thread():
        ref = encoder.encode(texts)
    assert np.abs(emb - ref).max() <= 1e-6, np.abs(emb - ref).max()


def test_embedder_batch_formats(model, encoder):
    """The callable itself (no Ray needed): Arrow tables and dicts of numpy arrays in, the same out."""
    texts = texts_for("jsonl", 40)
    with single_thread():
        embedder = ray_engine.Embedder(str(model), column="vec", threads=1)
        ref = encoder.encode(texts)
        table = embedder(pa.table({"text": texts, "n": list(range(40))}))
        batch = embedder({"text": np.array(texts, dtype=object), "n": np.arange(40)})
    assert table.column_names == ["text", "n", "vec"] and table.column("n").to_pylist() == list(range(40))
    assert np.array_equal(np.stack([np.asarray(v, np.float32) for v in table.column("vec").to_pylist()]), ref)
    assert np.array_equal(batch["vec"], ref) and np.array_equal(batch["n"], np.arange(40))
    with pytest.raises(CorpusError, match=r"'text' of a row in this batch \(its row 1\) is NoneType"):
        embedder(pa.table({"text": ["가", None]}))
    with pytest.raises(CorpusError, match="precision='int8' needs ranges"):
        ray_engine.Embedder(str(model), precision="int8")
    quantized = ray_engine.Embedder(str(model), precision="ubinary", threads=1)({"text": np.array(texts, dtype=object)})
    assert quantized["embedding"].dtype == np.uint8 and quantized["embedding"].shape == (40, 8)
