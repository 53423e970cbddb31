"""A real fine-tune: all-MiniLM-L6-v2 on KorSTS train, minisbert's ``fit`` and sentence-transformers' ``old_fit``.

The klue-sroberta card's phase 2 on another model: CosineSimilarityLoss, batch 32, shuffled, lr 2e-5,
WarmupLinear with 10% warmup, weight decay 0.01, gradient norm 1, dropout on; the final model is scored
on KorSTS test (cosine Spearman x 100, ``minisbert.sts.evaluate_sts`` for both systems) before and after.
``--multitask-steps N`` adds a run in ko-sroberta-multitask's shape: KorNLI triplets (the XNLI dev and
test files, MultipleNegativesRankingLoss, scale 20, batch 64, no duplicates) and KorSTS train
(CosineSimilarityLoss, batch 8, shuffled) in round robin for N steps.

Each system trains in its own child process (so each peak RSS is its own), one after the other; the
table gives the training wall time (the fit call, not loading or scoring) and the process's peak RSS.

    python scripts/train_korsts.py --epochs 1
    python scripts/train_korsts.py --epochs 0 --multitask-steps 60     # only the multitask run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from conftest import shared_data  # noqa: E402  (tests/conftest.py: the one way to the shared data)

from minisbert.fast.cpu import cpu_kind  # noqa: E402
from minisbert.sts import evaluate_sts, read_sts  # noqa: E402


def data_files() -> dict[str, Path]:
    files = {"train": "korsts/sts-train.tsv", "test": "korsts/sts-test.tsv",
             "nli-dev": "kornli/xnli.dev.ko.tsv", "nli-test": "kornli/xnli.test.ko.tsv"}
    found = {k: shared_data(v) for k, v in files.items()}
    missing = [files[k] for k, v in found.items() if v is None]
    if missing:
        sys.exit(f"needs {', '.join(missing)} of the shared data (MINISBERT_SHARED_DATA)")
    return found


def recipe_dict(files: dict[str, Path], task: str, epochs: int, steps: int, seed: int) -> dict:
    sts = {"data": str(files["train"]), "format": "korsts", "loss": "CosineSimilarityLoss", "sampler": "shuffle"}
    if task == "sts":
        objectives = [dict(sts, batch_size=32)]
        total = epochs * -(-5749 // 32)
        fit = {"epochs": epochs, "steps_per_epoch": None}
    else:
        nli = {"data": [str(files["nli-dev"]), str(files["nli-test"])], "format": "kornli",
               "loss": "MultipleNegativesRankingLoss", "loss_params": {"scale": 20.0, "similarity_fct": "cos_sim"}}
        objectives = [dict(nli, batch_size=64, sampler="no_duplicates"), dict(sts, batch_size=8)]
        total = steps
        fit = {"epochs": 1, "steps_per_epoch": steps}
    fit.update({"scheduler": "WarmupLinear", "warmup_steps": total // 10, "optimizer_params": {"lr": 2e-5},
                "weight_decay": 0.01, "max_grad_norm": 1})
    return {"objectives": objectives, "fit": fit, "seed": seed}


def cosine_spearman(model, data) -> float:
    return 100 * evaluate_sts(model, data.sentences1, data.sentences2, data.scores)["cosine_spearman"]


def child(system: str, model: str, task: str, epochs: int, steps: int, seed: int) -> dict:
    """Train in this process; return the scores, the fit's wall time and this process's peak RSS."""
    import torch

    from minisbert import train
    from minisbert.io.hub import resolve
    from minisbert.train.data import read_examples

    files = data_files()
    test = read_sts(files["test"])
    recipe = train.parse_recipe(recipe_dict(files, task, epochs, steps, seed))
    path = str(resolve(model))
    if system == "minisbert":
        from minisbert.encoder import SentenceEncoder

        encoder = SentenceEncoder.from_pretrained(path)
        before = cosine_spearman(encoder, test)
        start = time.perf_counter()
        train.fit(encoder, recipe, None, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - start
        after = cosine_spearman(encoder, test)
    else:
        from sentence_transformers import InputExample, SentenceTransformer, losses
        from sentence_transformers.sentence_transformer.datasets.no_duplicates_dataloader import (
            NoDuplicatesDataLoader,
        )
        from torch.utils.data import DataLoader

        random.seed(seed)
        torch.manual_seed(seed)
        st = SentenceTransformer(path, device="cpu")
        before = cosine_spearman(st, test)
        objectives = []
        for o in recipe.objectives:  # the same examples minisbert reads (KorNLI's partner draws included)
            ex = read_examples(list(o.data), o.format, random.Random(seed))
            items = [InputExample(texts=list(t), label=ex.scores[i] if ex.scores else 0.0)
                     for i, t in enumerate(ex.texts)]
            if o.sampler == "no_duplicates":
                loader = NoDuplicatesDataLoader(items, batch_size=o.batch_size)
                objectives.append((loader, losses.MultipleNegativesRankingLoss(st, scale=20.0)))
            else:
                loader = DataLoader(items, batch_size=o.batch_size, shuffle=True)
                objectives.append((loader, losses.CosineSimilarityLoss(st)))
        f = recipe.fit
        start = time.perf_counter()
        st.old_fit(objectives, epochs=f.epochs, steps_per_epoch=f.steps_per_epoch, scheduler="WarmupLinear",
                   warmup_steps=f.warmup_steps, optimizer_params=f.optimizer_params, weight_decay=f.weight_decay,
                   max_grad_norm=f.max_grad_norm, show_progress_bar=sys.stderr.isatty())
        seconds = time.perf_counter() - start
        after = cosine_spearman(st, test)
    # VmHWM: this process's own peak (ru_maxrss would start from the parent's RSS at fork)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return {"system": system, "task": task, "before": before, "after": after, "train_seconds": seconds,
            "peak_rss_mib": peak, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--epochs", type=int, default=1, help="KorSTS epochs (0: skip the STS run)")
    parser.add_argument("--multitask-steps", type=int, default=0, help="steps of the multitask run (0: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "TASK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.model, args.child[1], args.epochs, args.multitask_steps,
                               args.seed)))
        return
    data_files()
    runs = ([("sts", s) for s in ("minisbert", "old_fit")] if args.epochs else []) + \
           ([("multitask", s) for s in ("minisbert", "old_fit")] if args.multitask_steps else [])
    print(f"{args.model}; CPU: {cpu_kind().describe()}, {os.cpu_count()} vCPUs; epochs {args.epochs}, multitask steps "
          f"{args.multitask_steps}, seed {args.seed}")
    print("| run | system | KorSTS test cos Spearman before | after | training wall time | peak RSS |")
    print("|---|---|---|---|---|---|")
    for task, system in runs:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--epochs", str(args.epochs),
                              "--multitask-steps", str(args.multitask_steps), "--seed", str(args.seed),
                              "--child", system, task], check=True, stdout=subprocess.PIPE, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {task} | {system} | {r['before']:.2f} | {r['after']:.2f} | {r['train_seconds']:.0f} s | "
              f"{r['peak_rss_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
