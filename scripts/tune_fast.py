"""A/B timings of the fast path's tuned constants: each setting its own packed forward, timed in one process.

Every sweep builds one packed forward per setting over the same model (``fast_forward(model,
**options)``, the keywords the constants are the defaults of) and runs the same texts through each in
turns, the order rotated every pass, so a shared machine's drift hits every setting alike. It prints
each setting's median time, its change against the first setting, and its largest difference to the
first setting's pooled embeddings (0: bitwise the same). The heap runs in alternating processes
(glibc's threshold is per process); ``--mkl-rows`` finds the row counts MKL rounds differently.

    python scripts/tune_fast.py --model random-bert --n 256 --ffn-rows 0,512,768,1024,2048
    python scripts/tune_fast.py --model random-deberta --n 256 --chunk-mib 4,8,16,32,inf
    python scripts/tune_fast.py --model random-deberta --n 256 --round-to 1,8,16,32
    python scripts/tune_fast.py --model all-MiniLM-L6-v2 --n 512 --rotation-block 1,16,32,64,128
    python scripts/tune_fast.py --model random-bert --n 512 --token-budget --pad-multiple 1,8,16
    python scripts/tune_fast.py --model random-bert --n 256 --heap
    python scripts/tune_fast.py --mkl-rows
    python scripts/tune_fast.py --model random-bert --tiny --n 64 --repeats 2 --ffn-rows 0,32 --heap  # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench import RANDOM, build_random, workload  # noqa: E402 (sets the environment and sys.path for minisbert)

from minisbert import runner as runner_module  # noqa: E402
from minisbert.fast.cpu import cpu_kind  # noqa: E402
from minisbert.fast.runner import PackedRunner, fast_forward  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def mib(text: str) -> list[int]:
    return [1 << 60 if v == "inf" else int(float(v) * (1 << 20)) for v in text.split(",")]


def sweeps(args) -> list[tuple[str, list[tuple[str, dict, dict]]]]:
    """(title, [(label, fast_forward options, settings applied around each pass)]) per asked sweep."""
    out = []
    if args.ffn_rows:
        out.append(("FFN row chunk (PackedBlock ffn_rows; 0: one pass)",
                    [(f"ffn_rows={v}", {"ffn_rows": v}, {}) for v in ints(args.ffn_rows)]))
    if args.chunk_mib:
        out.append(("DeBERTa attention chunk (FastDebertaV2 chunk_bytes)",
                    [(f"chunk={v / 2**20:g} MiB" if v < 1 << 60 else "chunk=whole group", {"chunk_bytes": v}, {})
                     for v in mib(args.chunk_mib)]))
    if args.round_to:
        out.append(("DeBERTa relative-score GEMM width multiple (FastDebertaV2 round_to)",
                    [(f"round_to={v}", {"round_to": v}, {}) for v in ints(args.round_to)]))
    if args.rotation_block:
        out.append(("int8 Hadamard block (Linear rotation_block; 1: no rotation)",
                    [(f"rotation={v}", {"quantize": "int8", "rotation_block": v}, {})
                     for v in ints(args.rotation_block)]))
    if args.token_budget:
        out.append(("batches (packing.token_batches: filled to a token budget, or plain batch_size texts)",
                    [("token budget", {}, {"MINISBERT_TOKEN_BUDGET": "1"}),
                     ("plain batches", {}, {"MINISBERT_TOKEN_BUDGET": "0"})]))
    if args.pad_multiple:
        out.append(("padded length multiple (runner.PAD_MULTIPLE)",
                    [(f"pad_multiple={v}", {}, {"PAD_MULTIPLE": v}) for v in ints(args.pad_multiple)]))
    return out


@contextlib.contextmanager
def applied(settings: dict):
    """The environment variables and ``runner.PAD_MULTIPLE`` a setting names, for one pass."""
    saved_env = {k: os.environ.get(k) for k in settings if k != "PAD_MULTIPLE"}
    saved_pad = runner_module.PAD_MULTIPLE
    for key, value in settings.items():
        if key == "PAD_MULTIPLE":
            runner_module.PAD_MULTIPLE = value
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        runner_module.PAD_MULTIPLE = saved_pad
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def embed_all(runner: PackedRunner, ids: list[list[int]], batch_size: int, max_seq_length: int) -> torch.Tensor:
    """Pooled vectors of every text, in input order, as ``encode`` batches them."""
    rows = [None] * len(ids)
    for batch in runner.batches(ids, batch_size, max_seq_length):
        for i, row in zip(batch, runner.embed([ids[i] for i in batch])):
            rows[i] = row
    return torch.stack(rows)


def run_sweep(encoder, texts: list[str], title: str, settings: list, args) -> None:
    ids = encoder.tokenizer.encode_ids(texts)
    runners = {label: PackedRunner(fast_forward(encoder.model, **options), encoder.tokenizer.pad_id,
                                   encoder.pooling.modes, encoder.max_tokens) for label, options, _ in settings}
    env = {label: extra for label, _, extra in settings}
    quantized = any(options.get("quantize") for _, options, _ in settings)
    fp32 = None
    if quantized:  # int8 is inexact: each block size's cosine to the fp32 packed forward
        plain = PackedRunner(fast_forward(encoder.model), encoder.tokenizer.pad_id, encoder.pooling.modes,
                             encoder.max_tokens)
        fp32 = embed_all(plain, ids, args.batch_size, encoder.max_seq_length)
    seconds = {label: [] for label in runners}
    first = {}
    with torch.inference_mode():
        for label, run in runners.items():  # warm-up pass: shapes, caches, and the embeddings to compare
            with applied(env[label]):
                first[label] = embed_all(run, ids, args.batch_size, encoder.max_seq_length)
        labels = list(runners)
        for r in range(args.repeats):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                with applied(env[label]):
                    t = time.perf_counter()
                    embed_all(runners[label], ids, args.batch_size, encoder.max_seq_length)
                    seconds[label].append(time.perf_counter() - t)
    print(f"\n== {title}: {len(texts)} texts, batch {args.batch_size}, {args.repeats} interleaved passes")
    base_label = labels[0]
    base = statistics.median(seconds[base_label])
    for label in labels:
        s = statistics.median(seconds[label])
        diff = (first[label] - first[base_label]).abs().max().item()
        line = f"  {label:<22} {s:8.3f} s median ({100 * (s / base - 1):+6.1f}% vs {base_label})  max diff {diff:.2e}"
        if fp32 is not None:
            cos = torch.nn.functional.cosine_similarity(first[label].double(), fp32.double(), dim=1)
            line += f"  lowest cosine to fp32 {cos.min().item():.5f}"
        print(line)


HEAP_CHILD = "--heap-child"


def heap_child(path: str, n: int, batch_size: int) -> None:
    """One process's encode after a warm-up: seconds, minor page faults and system seconds of the timed pass."""
    from minisbert import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(path)
    texts = workload(n)
    encoder.encode(texts[: 2 * batch_size], batch_size=batch_size)
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    encoder.encode(texts, batch_size=batch_size)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    print(wall, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)


def heap_sweep(path: str, args) -> None:
    """MINISBERT_HEAP=1 against =0 (heap.raise_mmap_threshold), alternating fresh processes."""
    results = {"primed": [], "unprimed": []}
    for r in range(args.repeats):
        for mode in (("primed", "unprimed") if r % 2 == 0 else ("unprimed", "primed")):
            env = dict(os.environ, MINISBERT_HEAP="1" if mode == "primed" else "0")
            out = subprocess.run([sys.executable, __file__, HEAP_CHILD, str(path), str(args.n), str(args.batch_size)],
                                 env=env, capture_output=True, text=True, check=True)
            results[mode].append([float(v) for v in out.stdout.split()[-3:]])
    print(f"\n== heap (MINISBERT_HEAP): {args.n} texts, batch {args.batch_size}, {args.repeats} alternating "
          f"process pairs, medians")
    for mode, rows in results.items():
        wall, faults, system = (statistics.median(col) for col in zip(*rows))
        print(f"  {mode:<10} {wall:8.3f} s  {faults:10.0f} minor page faults  {system:6.2f} s system")


def mkl_rows(args) -> None:
    """Which row counts F.linear (MKL) rounds differently from the same rows inside a larger GEMM."""
    g = torch.Generator().manual_seed(0)
    for k, n_out in ((768, 768), (768, 3072), (3072, 768), (384, 1536)):
        w, b = torch.randn(n_out, k, generator=g), torch.randn(n_out, generator=g)
        x = torch.randn(256, k, generator=g)
        full = torch.nn.functional.linear(x, w, b)
        differ = [n for n in range(1, args.mkl_max + 1) if not torch.equal(torch.nn.functional.linear(x[:n], w, b),
                                                                           full[:n])]
        print(f"  {k} -> {n_out}: rows that differ from a 256-row GEMM: {differ or 'none'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-bert", help="folder, hub id, or random-bert/-roberta/-deberta")
    p.add_argument("--tiny", action="store_true", help="with random-*: a tiny model (for smoke runs)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--n", type=int, default=256, help="texts (bench.py's mixed workload)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4, help="timed passes per setting")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ffn-rows", help="comma-separated FFN row chunks to compare, e.g. 0,512,1024")
    p.add_argument("--chunk-mib", help="DeBERTa attention chunk sizes in MiB, e.g. 4,8,16,inf")
    p.add_argument("--round-to", help="DeBERTa relative GEMM width multiples, e.g. 1,16")
    p.add_argument("--rotation-block", help="int8 Hadamard block sizes, e.g. 1,64 (prints cosine to fp32)")
    p.add_argument("--token-budget", action="store_true", help="token-budget batches against plain ones")
    p.add_argument("--pad-multiple", help="padded length multiples (runner.PAD_MULTIPLE), e.g. 1,8,16")
    p.add_argument("--heap", action="store_true", help="primed heap against not, in alternating processes")
    p.add_argument("--mkl-rows", action="store_true", help="the row counts MKL's sgemm rounds differently")
    p.add_argument("--mkl-max", type=int, default=32, help="with --mkl-rows: the largest row count tried")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_kind().describe()}; torch threads {torch.get_num_threads()}")
    if args.mkl_rows:
        mkl_rows(args)
    todo = sweeps(args)
    if not todo and not args.heap:
        if not args.mkl_rows:
            p.error("name at least one sweep (--ffn-rows, --chunk-mib, --round-to, --rotation-block, "
                    "--token-budget, --pad-multiple, --heap, --mkl-rows)")
        return
    from minisbert import SentenceEncoder

    path = build_random(args.model, args.max_seq_length, args.tiny) if args.model in RANDOM else args.model
    encoder = SentenceEncoder.from_pretrained(path)
    encoder.max_seq_length = min(args.max_seq_length, encoder.max_seq_length)
    texts = workload(args.n)
    print(f"model {args.model}: {encoder.model.config.hidden_size} wide, {len(encoder.model.blocks)} layers")
    for title, settings in todo:
        run_sweep(encoder, texts, title, settings, args)
    if args.heap:
        heap_sweep(path, args)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == HEAP_CHILD:
        heap_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
