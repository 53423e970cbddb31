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
