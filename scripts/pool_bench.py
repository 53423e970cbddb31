"""Throughput of the multi-process pool: minisbert in one process, minisbert's pool, sentence-transformers
in one process and sentence-transformers' pool, on the same corpus, in one process.

The four systems take turns (A B C D, then B C D A, ...) on the whole corpus, so a machine shared with
other work slows them alike; the median texts/s of each over the repetitions is reported, with the
ratios. Pools are started once, before timing (their start-up time is printed apart). Each pool has
one worker per core: minisbert's run cores // workers torch threads each (here 1), sentence-
transformers' workers keep torch's default (all cores each), as that package starts them.

    python scripts/pool_bench.py --model all-MiniLM-L6-v2 --n 4000 --repeats 3

The corpus is KorSTS train sentences (../shared/data) when present, else generated sentences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def texts_for(n: int) -> list[str]:
    from conftest import korsts_sentences

    texts = korsts_sentences("train")
    if not texts:
        texts = [f"{i}번째 문장은 코퍼스 임베딩의 속도를 재기 위한 것입니다. sentence number {i}." for i in range(n)]
    return (texts * (n // len(texts) + 1))[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="folder, short name or hub id")
    parser.add_argument("--n", type=int, default=4000, help="texts in the corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="pool workers (default: one per core)")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from minisbert import SentenceEncoder
    from minisbert.encoding.workers import usable_cores
    from minisbert.io import hub

    texts = texts_for(args.n)
    folder = str(hub.resolve(args.model))
    workers = args.workers or usable_cores()
    ours, ref = SentenceEncoder.from_pretrained(folder), SentenceTransformer(folder, device="cpu")
    t = time.perf_counter()
    our_pool = ours.start_multi_process_pool(["cpu"] * workers)
    ours.encode(texts[:64], pool=our_pool)  # every worker up (unpickled, fast path built) before timing
    our_start = time.perf_counter() - t
    t = time.perf_counter()
    ref_pool = ref.start_multi_process_pool(["cpu"] * workers)
    ref.encode(texts[:64], pool=ref_pool)
    ref_start = time.perf_counter() - t
    systems = {
        "minisbert": lambda: ours.encode(texts, batch_size=args.batch_size),
        "minisbert pool": lambda: ours.encode(texts, batch_size=args.batch_size, pool=our_pool),
        "st": lambda: ref.encode(texts, batch_size=args.batch_size),
        "st pool": lambda: ref.encode(texts, batch_size=args.batch_size, pool=ref_pool),
    }
    for run in systems.values():  # warm-up: lazy allocations, thread pools, oneDNN primitives
        run()
    rates: dict[str, list[float]] = {name: [] for name in systems}
    outputs = {}
    names = list(systems)
    try:
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                outputs[name] = systems[name]()
                rates[name].append(len(texts) / (time.perf_counter() - t))
    finally:
        ours.stop_multi_process_pool(our_pool)
        ref.stop_multi_process_pool(ref_pool)

    cpu = " ".join(open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].split(":")[1].split()) \
        if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"{args.model}, {len(texts)} texts, batch {args.batch_size}, {usable_cores()} cores ({cpu}), torch "
          f"{torch.__version__}, pools of {workers} workers (minisbert: {our_pool['threads']} thread(s) each)")
    print(f"pool start-up (to first result): minisbert {our_start:.1f} s, sentence-transformers {ref_start:.1f} s")
    median = {name: statistics.median(r) for name, r in rates.items()}
    for name in names:
        print(f"  {name:15s} {median[name]:8.1f} texts/s   runs: " + ", ".join(f"{x:.1f}" for x in rates[name]))
    print(f"minisbert pool / minisbert one process:  {median['minisbert pool'] / median['minisbert']:.2f}x")
    print(f"minisbert pool / st pool:                {median['minisbert pool'] / median['st pool']:.2f}x")
    print(f"minisbert pool / st one process:         {median['minisbert pool'] / median['st']:.2f}x")
    print(f"st pool / st one process:                {median['st pool'] / median['st']:.2f}x")
    diff = max(float(np.abs(outputs[name] - outputs["st"]).max()) for name in names)
    print(f"max abs diff of every system's embeddings to sentence-transformers' one process: {diff:.2e}")


if __name__ == "__main__":
    main()
