"""Where one ``encode`` spends its time: torch.profiler's top operators (CPU and CUDA) for minisbert's
fast path, optionally beside sentence-transformers, on the benchmark's workload.

    python scripts/profile_encode.py --model random-bert --device cuda --dtype float16 --n 2048
    python scripts/profile_encode.py --model random-bert --quantize int8
    python scripts/profile_encode.py --model random-bert --quantize int8 --static
    python scripts/profile_encode.py --model random-deberta --max-seq-length 512 --texts passages --n 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench import RANDOM, WORKLOADS, build_random, calibration_texts, st_torch, workload  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-bert")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8"], help="profile minisbert's int8 mode")
    p.add_argument("--static", action="store_true",
                   help="with --quantize int8: static int8, calibrated on bench.calibration_texts")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--texts", default="mixed", choices=WORKLOADS)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows", type=int, default=20, help="operators to print")
    p.add_argument("--st", action="store_true", help="profile sentence-transformers too")
    args = p.parse_args(argv)

    from minisbert import SentenceEncoder

    dtype = getattr(torch, args.dtype)
    path = build_random(args.model, args.max_seq_length) if args.model in RANDOM else args.model
    texts = workload(args.n, kind=args.texts)
    ours = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, quantize=args.quantize)
    ours.max_seq_length = min(args.max_seq_length, ours.max_seq_length)
    if args.static and args.quantize:
        exact = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype)
        exact.max_seq_length = ours.max_seq_length
        with exact.runner.forward.observe() as ranges:
            exact.encode(calibration_texts(kind=args.texts), batch_size=args.batch_size)
        ours.runner.forward.use_ranges(ranges)
    systems = {"minisbert": ours}
    if args.st:
        systems["st"] = st_torch(ours.source, args.device, dtype, ours.max_seq_length)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    for name, model in systems.items():
        model.encode(texts[: 4 * args.batch_size], batch_size=args.batch_size)  # warm-up (and compiles)
        t = time.perf_counter()
        model.encode(texts, batch_size=args.batch_size)
        wall = time.perf_counter() - t
        with torch.profiler.profile(activities=activities) as prof:
            model.encode(texts, batch_size=args.batch_size)
        print(f"== {name}: {args.n / wall:.1f} sent/s unprofiled ({wall * 1e3:.0f} ms for {args.n} texts)")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
