"""``minisbert train --model M --recipe R --output OUT``: fine-tune with a recipe (``loop.fit``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minisbert.checks import check_device
from minisbert.encoder import SentenceEncoder
from minisbert.train import distributed
from minisbert.train.loop import fit
from minisbert.train.recipe import read_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model folder, short name from weights/models.json (e.g. all-MiniLM-L6-v2), or hub id")
    parser.add_argument("--recipe", required=True, help="recipe JSON (see recipes/ and docs/training.md)")
    parser.add_argument("--output", required=True, help="new or empty folder for the trained model and logs")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, help="random seed for data order and dropout (None: the recipe's seed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest training state in --output (fit.checkpoint_save_steps "
                             "writes them); refused for another recipe or model")


def run(args: argparse.Namespace) -> int:
    # Everything checkable fails before the model loads: device, recipe keys, data files, output folder.
    device = check_device(args.device)
    recipe = read_recipe(args.recipe)
    output = Path(args.output)
    if args.resume:
        if not (output / "checkpoints").is_dir():
            raise ValueError(f"--resume: {output} holds no training state (checkpoints/)")
    elif os.environ.get("RANK", "0") == "0" and output.exists() and (not output.is_dir() or any(output.iterdir())):
        # (rank 0 checks: the others may start after it has begun writing)
        raise ValueError(f"--output {output}: exists and is not an empty folder")
    device = distributed.init(device)  # under torchrun: join the group; one process: nothing
    encoder = SentenceEncoder.from_pretrained(args.model, device=device)
    # A bar on a terminal, progress lines elsewhere; under torchrun rank 0 alone prints and writes.
    result = fit(encoder, recipe, output, seed=args.seed, resume=args.resume, model_name=args.model)
    if distributed.world()[0] != 0:
        return 0
    print(f"{result.steps} steps in {result.seconds:.0f} s; model, eval/ and train_loss.csv in {output}",
          file=sys.stderr)
    if result.best_score is not None:
        print(f"best score (max Spearman) {result.best_score:.4f}", file=sys.stderr)
    return 0


def add_mine_arguments(parser: argparse.ArgumentParser) -> None:
    """``minisbert mine-hard-negatives``: sentence-transformers' ``mine_hard_negatives`` (``mine.py``)."""
    parser.add_argument("--model", required=True, help="model folder, short name or hub id")
    parser.add_argument("--data", required=True,
                        help="(anchor, positive) table: .jsonl, .parquet, .csv or .tsv (the first two columns)")
    parser.add_argument("--output", required=True, help="the mined table, JSON Lines (written atomically)")
    parser.add_argument("--corpus", help="more candidate texts, one per line (the positives are always candidates)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per encode batch")
    parser.add_argument("--range-min", type=int, default=0, help="skip this many of the best candidates")
    parser.add_argument("--range-max", type=int, help="consider candidates up to this rank (default: as "
                        "sentence-transformers, from --num-negatives and the filters)")
    parser.add_argument("--max-score", type=float, help="leave out candidates scoring above this")
    parser.add_argument("--min-score", type=float, help="leave out candidates scoring below this")
    parser.add_argument("--margin", "--absolute-margin", dest="absolute_margin", type=float,
                        help="leave out candidates within this of the anchor's weakest positive")
    parser.add_argument("--relative-margin", type=float,
                        help="leave out candidates above positive - |positive| * this")
    parser.add_argument("--num-negatives", type=int, default=3, help="negatives per anchor")
    parser.add_argument("--sampling-strategy", choices=("top", "random"), default="top",
                        help="the best remaining candidates, or that many drawn at random")
    parser.add_argument("--output-format", choices=("triplet", "n-tuple"), default="triplet",
                        help="a row per negative, or a row per pair with every negative")
    parser.add_argument("--include-positives", action="store_true",
                        help="keep the positives among the candidates (n-tuple output)")
    parser.add_argument("--seed", type=int, default=0, help="for --sampling-strategy random")


def run_mine(args: argparse.Namespace) -> int:
    import json
    import random

    from minisbert.io.files import atomic_path
    from minisbert.train.data import read_dataset
    from minisbert.train.mine import mine_hard_negatives

    table = read_dataset(Path(args.data))
    if len(table.texts[0]) < 2:
        raise ValueError(f"--data {args.data}: needs an anchor and a positive column")
    corpus = None
    if args.corpus:
        corpus = [line.rstrip("\n") for line in open(args.corpus, encoding="utf-8") if line.strip()]
    encoder = SentenceEncoder.from_pretrained(args.model, device=check_device(args.device))
    names, rows = mine_hard_negatives(
        encoder, [t[0] for t in table.texts], [t[1] for t in table.texts], corpus, range_min=args.range_min,
        range_max=args.range_max, max_score=args.max_score, min_score=args.min_score,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin,
        num_negatives=args.num_negatives, sampling_strategy=args.sampling_strategy,
        include_positives=args.include_positives, output_format=args.output_format, batch_size=args.batch_size,
        rng=random.Random(args.seed))
    with atomic_path(args.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(zip(names, row)), ensure_ascii=False) + "\n")
    print(f"{len(rows)} rows ({', '.join(names)}) from {len(table)} pairs to {args.output}", file=sys.stderr)
    return 0
