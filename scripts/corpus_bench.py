"""Rows per second of ``embed-corpus``'s engines against sentence-transformers' multi-process pool, on
one corpus of KorSTS/KorNLI sentences, and the local engine's peak memory at two corpus sizes.

    python scripts/corpus_bench.py --model all-MiniLM-L6-v2 --rows 20000 --rounds 2 --json out.json
    python scripts/corpus_bench.py --model random-roberta --rows 2000 --systems local-1
    python scripts/corpus_bench.py --memory 10000,200000 --model random-bert-tiny

Systems, each a whole job from the corpus file to embeddings, startup included (loading the model, starting
workers or actors), as a user would run it:

- ``local-1``: ``embed-corpus --engine local`` in this process (torch's default threads: every core);
- ``local-2``: the same with ``--workers 2`` (two worker processes of one thread, each embedding whole parts);
- ``ray-2``: ``--engine ray --workers 2 --threads 1`` on a local Ray instance of every core, started once
  before the first round (its start is reported apart: a cluster is up before a job);
- ``st-pool``: sentence-transformers' ``start_multi_process_pool(["cpu"] * 2)`` and ``encode(pool=...)``
  on the texts read from the same file, written to one Parquet file.

The systems take turns (the order rotates each round), so a shared machine's load falls on all of
them; the load average is printed before each run. ``--memory`` runs the local engine in a fresh
process per size and reports its peak RSS (``VmHWM``).

``--model``: a folder, short name or hub id; ``random-bert`` / ``random-roberta`` (base size, random
weights, Korean WordPiece; see scripts/bench.py), ``random-bert-tiny`` (tiny, for the memory runs).
The corpus: sentence1/sentence2 of KorSTS train/dev/test and KorNLI's XNLI dev/test from
``$MINISBERT_SHARED_DATA`` (default ``../shared/data`` beside the repository), read with csv.QUOTE_NONE.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "scripts"))
sys.path.insert(2, str(REPO / "tests"))

SYSTEMS = ("local-1", "local-2", "ray-2", "st-pool")
FILES = ("korsts/sts-train.tsv", "korsts/sts-dev.tsv", "korsts/sts-test.tsv", "kornli/xnli.dev.ko.tsv",
         "kornli/xnli.test.ko.tsv")


def sentences(rows: int) -> list[str]:
    """``rows`` sentences of KorSTS and KorNLI in file order, repeated when more are asked for."""
    from conftest import shared_data  # the one lookup of the shared data (MINISBERT_SHARED_DATA)

    out = []
    for name in FILES:
        path = shared_data(name)
        if path is None:
            sys.exit(f"{name}: not in the shared data (set MINISBERT_SHARED_DATA to the folder of korsts/, kornli/)")
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                out += [row["sentence1"], row["sentence2"]]
    return [out[i % len(out)] for i in range(rows)]


def model_path(name: str) -> str:
    if name.startswith("random-"):
        from bench import build_random

        tiny = name.endswith("-tiny")
        return str(build_random(name.removesuffix("-tiny"), 128, tiny=tiny))
    from minisbert.io import hub

    return str(hub.resolve(name))  # a folder, which sentence-transformers loads too


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_system(system: str, src: Path, out: Path, model: str, batch_size: int, rows_per_part: int) -> float:
    """Seconds for one whole job of ``system``."""
    from minisbert import corpus
    from minisbert.corpus import ray_engine

    shutil.rmtree(out, ignore_errors=True)
    settings = corpus.CorpusSettings(model, rows_per_part=rows_per_part)
    t = time.perf_counter()
    if system in ("local-1", "local-2"):
        corpus.embed_corpus([str(src)], str(out), settings, batch_size=batch_size,
                            workers=1 if system == "local-1" else 2, show_progress=False)
    elif system == "ray-2":
        ray_engine.embed_corpus([str(src)], str(out), settings, batch_size=batch_size, workers=2, threads=1,
                              show_progress=False)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from sentence_transformers import SentenceTransformer

        texts = [json.loads(line)["text"] for line in src.open(encoding="utf-8")]
        st = SentenceTransformer(model, device="cpu")
        pool = st.start_multi_process_pool(["cpu"] * 2)
        try:
            emb = st.encode(texts, pool=pool, batch_size=batch_size)
        finally:
            st.stop_multi_process_pool(pool)
        out.mkdir(parents=True)
        flat = pa.array(emb.reshape(-1))
        pq.write_table(pa.table({"id": list(range(len(texts))),
                                 "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}),
                       out / "part-0.parquet")
    return time.perf_counter() - t


def throughput(args) -> dict:
    model = model_path(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    texts = sentences(args.rows)
    src = tmp / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "model": args.model, "rows": args.rows,
              "batch_size": args.batch_size, "rows_per_part": args.rows_per_part, "runs": []}
    if "ray-2" in args.systems:
        import ray

        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get(
                     "PYTHONPATH")]))}})
        result["ray_init_s"] = time.perf_counter() - t
        print(f"ray.init: {result['ray_init_s']:.1f} s", flush=True)
    systems = list(args.systems)
    for r in range(args.rounds):
        order = systems[r % len(systems):] + systems[: r % len(systems)]
        for system in order:
            load = os.getloadavg()[0]
            seconds = run_system(system, src, tmp / system, model, args.batch_size, args.rows_per_part)
            run = {"round": r, "system": system, "seconds": seconds, "rows_per_s": args.rows / seconds,
                   "load_before": load, "load_after": os.getloadavg()[0]}
            result["runs"].append(run)
            print(f"round {r} {system:8s} {seconds:7.1f} s  {run['rows_per_s']:7.1f} rows/s  load "
                  f"{load:.1f} -> {run['load_after']:.1f}", flush=True)
    summary = {}
    for system in systems:
        rates = [x["rows_per_s"] for x in result["runs"] if x["system"] == system]
        summary[system] = {"rows_per_s": statistics.median(rates), "all": rates}
    base = summary[systems[0]]["rows_per_s"]
    for system in systems:
        summary[system][f"vs_{systems[0]}"] = summary[system]["rows_per_s"] / base
    result["summary"] = summary
    print(f"\n{args.rows} rows, {args.model}, {result['cpu']}, {os.cpu_count()} cores")
    for system, s in summary.items():
        print(f"{system:8s} {s['rows_per_s']:8.1f} rows/s  {s[f'vs_{systems[0]}']:.2f}x {systems[0]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def memory(args) -> dict:
    """Peak RSS of the local engine in a fresh process per corpus size."""
    model = model_path(args.model)
    out = {"cpu": cpu_name(), "model": args.model, "runs": []}
    for rows in (int(n) for n in args.memory.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="corpus-mem-"))
        src = tmp / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sentences(rows)),
                       encoding="utf-8")
        code = ("import resource, sys, time; from minisbert import corpus; t = time.perf_counter(); "
                f"corpus.embed_corpus([{str(src)!r}], {str(tmp / 'out')!r}, corpus.CorpusSettings({model!r}, "
                f"rows_per_part={args.rows_per_part}), batch_size={args.batch_size}, show_progress=False); "
                "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')), "
                "time.perf_counter() - t)")  # VmHWM: the child's own peak (ru_maxrss starts from the parent's)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        peak_kb, seconds = proc.stdout.split()
        run = {"rows": rows, "input_mb": src.stat().st_size / 1e6, "peak_rss_mb": int(peak_kb) / 1024,
               "seconds": float(seconds)}
        out["runs"].append(run)
        print(f"{rows:8d} rows ({run['input_mb']:.1f} MB of JSON Lines): peak RSS {run['peak_rss_mb']:.0f} MB, "
              f"{run['seconds']:.0f} s", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-part", type=int, default=1000)
    p.add_argument("--memory", help="comma-separated corpus sizes: peak RSS of the local engine at each")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args()
    result = memory(args) if args.memory else throughput(args)
    result["command"] = " ".join(sys.argv)
    result["max_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
