"""Training throughput: minisbert's ``fit`` against sentence-transformers' ``old_fit``, side by side in one process.

Both systems train their own copy of the same model, dropout on (the model's config), on the same batches:
KorSTS train pairs with CosineSimilarityLoss (the klue-sroberta card's phase 2), batch 32, in one fixed
shuffled order, or KorNLI triplets with MultipleNegativesRankingLoss (``--loss mnr``). Rounds alternate the
systems (minisbert first in even rounds, old_fit first in odd ones); in each round both run ``--steps``
steps on that round's batches, timed around the whole call (tokenizing, forward, backward, clipping,
AdamW). Prints examples/s per round and the median ratio.

    python scripts/train_bench.py                         # all-MiniLM-L6-v2, 6 rounds of 8 steps
    python scripts/train_bench.py --loss mnr --batch-size 64 --rounds 4
    python scripts/train_bench.py --model PATH --device cuda --amp   # AMP on both (fp16 + grad scaling)

``--scaling``: minisbert alone, MultipleNegativesRankingLoss against CachedMultipleNegativesRankingLoss
(mini-batches of 32) on KorNLI (anchor, positive) pairs at global batches 64, 256 and 1024, in one process
and in 2 gloo ranks (each half the batch, ``gather_across_devices``: the same global batch). Each
configuration runs in fresh processes: one warm-up step, then ``--steps`` timed steps; examples/s over
the timed steps, and the peak resident memory of training over the loaded model (VmHWM after
``/proc/self/clear_refs``; the largest rank's).

    python scripts/train_bench.py --scaling --steps 2 [--batches 64 256 1024] [--max-seq-length 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from conftest import shared_data  # noqa: E402  (tests/conftest.py: the one way to the shared data)

from minisbert import train  # noqa: E402
from minisbert.encoder import SentenceEncoder  # noqa: E402
from minisbert.fast.cpu import cpu_kind  # noqa: E402
from minisbert.io.hub import resolve  # noqa: E402
from minisbert.train.data import read_examples  # noqa: E402


def load_examples(loss: str):
    if loss == "cosine":
        path = shared_data("korsts/sts-train.tsv")
        if path is None:
            sys.exit("needs korsts/sts-train.tsv of the shared data (MINISBERT_SHARED_DATA)")
        return read_examples([path], "korsts", random.Random(0)), "scored-pairs", "CosineSimilarityLoss", {}
    paths = [shared_data("kornli/xnli.dev.ko.tsv"), shared_data("kornli/xnli.test.ko.tsv")]
    if None in paths:
        sys.exit("needs kornli/xnli.dev.ko.tsv and xnli.test.ko.tsv of the shared data (MINISBERT_SHARED_DATA)")
    return (read_examples(paths, "kornli", random.Random(0)), "triplets", "MultipleNegativesRankingLoss",
            {"scale": 20.0, "similarity_fct": "cos_sim"})


def run_minisbert(encoder, rows, fmt, loss, params, batch_size, steps, amp, folder: Path) -> None:
    """``steps`` steps of ``fit`` over ``rows`` in file order (the sequential sampler)."""
    data = folder / "round.tsv"
    assert not any("\t" in field or "\n" in field for row in rows for field in row)
    data.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    recipe = train.parse_recipe({
        "objectives": [{"data": str(data), "format": fmt, "loss": loss, "loss_params": params,
                        "batch_size": batch_size, "sampler": "sequential"}],
        "fit": {"epochs": 1, "steps_per_epoch": steps, "warmup_steps": 2, "use_amp": amp}})
    train.fit(encoder, recipe, None, progress=False)


def run_old_fit(st, rows, fmt, loss, params, batch_size, steps, amp) -> None:
    from sentence_transformers import InputExample, losses
    from torch.utils.data import DataLoader

    if fmt == "scored-pairs":
        items = [InputExample(texts=[a, b], label=float(s)) for a, b, s in rows]
        objective = losses.CosineSimilarityLoss(st)
    else:
        items = [InputExample(texts=list(r)) for r in rows]
        objective = losses.MultipleNegativesRankingLoss(st, scale=params["scale"])
    loader = DataLoader(items, batch_size=batch_size, shuffle=False)  # the same batches, in the same order
    st.old_fit([(loader, objective)], epochs=1, steps_per_epoch=steps, warmup_steps=2, use_amp=amp,
               show_progress_bar=False)


def scaling_one(args) -> None:
    """One configuration in this process (or this torchrun rank): prints a JSON line."""
    from minisbert.train import distributed

    distributed.init(torch.device("cpu"))
    rank, ranks = distributed.world()
    examples, *_ = load_examples("mnr")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.tsv"
        rows = examples.texts[: args.batch_size * (args.steps + 1)]
        data.write_text("".join(f"{a}\t{p}\n" for a, p, _ in rows), encoding="utf-8")
        loss = "CachedMultipleNegativesRankingLoss" if args.cached else "MultipleNegativesRankingLoss"
        params = {"gather_across_devices": ranks > 1, **({"mini_batch_size": 32} if args.cached else {})}

        def recipe(steps):
            return train.parse_recipe({
                "max_seq_length": args.max_seq_length,
                "objectives": [{"data": str(data), "format": "pairs", "loss": loss, "loss_params": params,
                                "batch_size": args.batch_size // ranks, "sampler": "sequential"}],
                "fit": {"epochs": 1, "steps_per_epoch": steps, "warmup_steps": 2}})

        encoder = SentenceEncoder.from_pretrained(str(resolve(args.model)))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from here
        base = rss("VmRSS")
        train.fit(encoder, recipe(1), None, progress=False)  # warm-up
        start = time.perf_counter()
        train.fit(encoder, recipe(args.steps), None, progress=False)
        seconds = time.perf_counter() - start
        peak = rss("VmHWM") - base
    print(json.dumps({"rank": rank, "examples_per_s": args.batch_size * args.steps / seconds, "peak_mib": peak}),
          flush=True)


def rss(field: str) -> float:
    """A /proc/self/status size in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def scaling(args) -> None:
    import subprocess

    print(f"CPU: {cpu_kind().describe()}, {os.cpu_count()} vCPUs; model {args.model}, KorNLI pairs, "
          f"max_seq_length {args.max_seq_length}, {args.steps} timed steps")
    print("| global batch | loss | ranks | examples/s | peak memory over the model (MiB, per rank) |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        for cached in [kind == "cached" for kind in args.losses]:
            for ranks in (1, 2):
                one = [__file__, "--scaling-one", "--model", args.model, "--batch-size", str(batch),
                       "--steps", str(args.steps), "--max-seq-length", str(args.max_seq_length)] + \
                    (["--cached"] if cached else [])
                launch = [sys.executable] if ranks == 1 else \
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() // ranks))
                done = subprocess.run(launch + one, capture_output=True, text=True, env=env)
                lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode != 0 or not lines:
                    print(f"| {batch} | {'cached' if cached else 'MNR'} | {ranks} | failed: "
                          f"{done.stderr.strip().splitlines()[-1:]} | |", flush=True)
                    continue
                rate = min(r["examples_per_s"] for r in lines)
                peak = max(r["peak_mib"] for r in lines)
                name = "CachedMNR (mini-batch 32)" if cached else "MNR"
                print(f"| {batch} | {name} | {ranks} | {rate:.1f} | {peak:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", action="store_true", help="the caching and ranks table (see above)")
    parser.add_argument("--scaling-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="--scaling's global batches")
    parser.add_argument("--max-seq-length", type=int, default=64, help="--scaling's max_seq_length")
    parser.add_argument("--losses", nargs="+", choices=("mnr", "cached"), default=["mnr", "cached"],
                        help="--scaling's losses (uncached MNR at batch 1024 needs ~16 GB)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model folder or short name")
    parser.add_argument("--loss", choices=("cosine", "mnr"), default="cosine")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per system per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="use_amp on both sides")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scaling_one:
        return scaling_one(args)
    if args.scaling:
        return scaling(args)

    from sentence_transformers import SentenceTransformer

    path = str(resolve(args.model))
    examples, fmt, loss, params = load_examples(args.loss)
    order = list(range(len(examples)))
    random.Random(1).shuffle(order)
    per_round = args.steps * args.batch_size
    if per_round * args.rounds > len(order):
        sys.exit(f"{args.rounds} rounds of {per_round} examples need more than the {len(order)} there are")
    encoder = SentenceEncoder.from_pretrained(path, device=args.device)
    st = SentenceTransformer(path, device=args.device)
    dropout = {k: v for k, v in encoder.folder.config.items() if k.endswith("dropout_prob")}
    print(f"model {args.model}, {args.loss} loss, batch {args.batch_size}, {args.steps} steps x {args.rounds} "
          f"rounds per system, dropout {dropout}, device {args.device}{' AMP' if args.amp else ''}")
    print(f"CPU: {cpu_kind().describe()}, {os.cpu_count()} vCPUs, torch threads {torch.get_num_threads()}")
    rates = {"minisbert": [], "old_fit": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ids = order[r * per_round: (r + 1) * per_round]
            rows = [tuple(examples.texts[i]) + ((f"{examples.scores[i]!r}",) if examples.scores else ()) for i in ids]
            systems = ["minisbert", "old_fit"] if r % 2 == 0 else ["old_fit", "minisbert"]
            for system in systems:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if system == "minisbert":
                    run_minisbert(encoder, rows, fmt, loss, params, args.batch_size, args.steps, args.amp, Path(tmp))
                else:
                    run_old_fit(st, rows, fmt, loss, params, args.batch_size, args.steps, args.amp)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                rates[system].append(per_round / (time.perf_counter() - start))
            print(f"round {r}: minisbert {rates['minisbert'][-1]:6.1f} examples/s, old_fit {rates['old_fit'][-1]:6.1f} "
                  f"({rates['minisbert'][-1] / rates['old_fit'][-1]:.2f}x)", flush=True)
    ratios = [a / b for a, b in zip(rates["minisbert"], rates["old_fit"])]
    summary = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"median_examples_per_s": summary, "median_ratio": statistics.median(ratios),
                      "ratios": [round(x, 3) for x in ratios]}))


if __name__ == "__main__":
    main()
