"""Cold start of the CLI: process start to first embedding, and what an OpenMP wait policy changes.

    python scripts/cold_start.py --model all-MiniLM-L6-v2 --runs 5 [--tree OTHER_CHECKOUT ...]

Each run is a fresh ``python -m minisbert encode --model M "..."`` process; runs of every variant
are interleaved (machines here are shared and noisy) and the medians printed. ``--tree`` adds
another checkout of minisbert (e.g. an older commit in a git worktree) as a variant: its processes
run in that folder, so ``python -m minisbert`` imports that checkout's package. The throughput part
encodes ``--texts`` sentences in a fresh process per variant, with ``OMP_WAIT_POLICY`` unset and set
to PASSIVE, so a default that helps the cold start can be checked for what it costs on long runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

THROUGHPUT = """
import sys, time, minisbert
n = int(sys.argv[2])
texts = [f"{i}번째 문장은 코퍼스 임베딩의 속도를 재기 위한 것입니다. sentence number {i}." for i in range(n)]
e = minisbert.SentenceEncoder.from_pretrained(sys.argv[1])
e.encode(texts[:64])
t = time.perf_counter(); e.encode(texts); print(len(texts) / (time.perf_counter() - t))
"""


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=env["PYTHONPATH"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--texts", type=int, default=512, help="sentences for the throughput part")
    parser.add_argument("--tree", action="append", default=[], help="another minisbert checkout to compare")
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    variants = {}
    for tree in [str(REPO)] + args.tree:
        name = "this tree" if tree == str(REPO) else tree
        env = dict(base, PYTHONPATH=tree)
        variants[name] = env
        variants[f"{name}, OMP_WAIT_POLICY=PASSIVE"] = dict(env, OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "minisbert", "encode", "--model", args.model, "첫 문장을 임베딩한다"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for env in variants.values():  # warm the page cache once
        run(cmd, env)
    for _ in range(args.runs):
        for name, env in variants.items():
            times[name].append(run(cmd, env))
    print(f"CLI process start to first embedding ({args.model}, median of {args.runs}, interleaved):")
    for name, ts in times.items():
        print(f"  {statistics.median(ts):6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})  {name}")

    print(f"encode throughput, {args.texts} sentences, fresh process each (sentences/s, interleaved):")
    rates: dict[str, list[float]] = {name: [] for name in variants if name.startswith("this tree")}
    for _ in range(max(2, args.runs // 2)):
        for name in rates:
            out = subprocess.run([sys.executable, "-c", THROUGHPUT, args.model, str(args.texts)], env=variants[name],
                                 check=True, capture_output=True, text=True, cwd=variants[name]["PYTHONPATH"]).stdout
            rates[name].append(float(out.strip().splitlines()[-1]))
    for name, rs in rates.items():
        print(f"  {statistics.median(rs):7.1f}  (all: {', '.join(f'{r:.1f}' for r in rs)})  {name}")


if __name__ == "__main__":
    main()
