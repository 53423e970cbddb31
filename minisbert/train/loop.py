"""Fine-tuning with the seed cards' recipes: sentence-transformers' legacy ``fit``, step for step.

    python -m minisbert train --model all-MiniLM-L6-v2 --recipe recipes/klue-sroberta-sts.json --output out

The recipe (``read_recipe``) is JSON: ``max_seq_length``; ``objectives``, each ``{"data", "format",
"loss", "loss_params", "batch_size", "sampler"}``; ``fit``, the cards' "Parameters of the fit()-Method"
block as printed; optionally ``evaluator`` (``{"data", "format": "korsts"}``), ``seed`` and
``description``.

One training step, as ``SentenceTransformer.old_fit`` (the fit that trained the seeds) does it, for
each objective in turn (round robin): its sampler's next batch -> every text column embedded by the
model in train mode (dropout on) -> its loss -> backward -> gradient norm clipped -> its own AdamW
steps -> its own scheduler steps. Also as ``old_fit``:

- one AdamW per objective, all over the same parameters (each keeps its own moments), with weight
  decay on every parameter but biases and LayerNorms; one learning-rate schedule per objective;
- an epoch is the shortest objective's number of batches (unless ``steps_per_epoch``); samplers are
  never reset at an epoch's end, a longer objective just goes on where it was;
- evaluation every ``evaluation_steps`` steps of an epoch and at each epoch's end, the model saved
  whenever the score (the best of the four Spearman correlations, what the legacy
  ``EmbeddingSimilarityEvaluator`` returned) beats the best so far; without an evaluator the final
  model is saved;
- ``use_amp``: fp16 autocast with gradient scaling on CUDA (a step whose scale changed skips the
  scheduler, as ``old_fit`` does); on a CPU, bf16 autocast, which needs no scaling (bf16 has fp32's range).

One thing differs, for speed, not for the math: each step's texts (all columns of a batch) are
embedded in groups of similar token counts, each group padded to its own longest text, instead of
each column padded to its own longest; the linears then run on ~1.5x fewer padded positions at
KorSTS's lengths. Groups change only the order of float sums (``tests/test_train.py`` holds the
steps to ``old_fit``'s within rounding).

The output folder gets the model (sentence-transformers layout), ``eval/similarity_evaluation_*_results.csv``
(sentence-transformers' columns) and ``train_loss.csv`` (every objective's loss and learning rate per step).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minisbert.checks import check_device
from minisbert.encoder import SentenceEncoder
from minisbert.errors import ConfigError
from minisbert.fast.cpu import cpu_kind
from minisbert.sts import METRICS, evaluate_sts, read_sts
from minisbert.train.data import Examples, Sampler, read_examples
from minisbert.train.losses import get_loss
from minisbert.train.recipe import FitParams, Recipe, RecipeError, read_recipe

log = logging.getLogger("minisbert")


# ---------------------------------------------------------------------------------------------------
# Optimizer and schedule


def no_decay(name: str, module: nn.Module) -> bool:
    """old_fit's rule, ``any(nd in name for nd in ["bias", "LayerNorm.bias", "LayerNorm.weight"])`` on
    Hugging Face names: biases and every LayerNorm parameter (DeBERTa's relative-table LayerNorm too)."""
    return name == "bias" or isinstance(module, nn.LayerNorm)


def adamw(modules: list[nn.Module], fit: FitParams) -> torch.optim.AdamW:
    decay, plain = [], []
    for m in modules:
        for sub in m.modules():
            for name, p in sub.named_parameters(recurse=False):
                (plain if no_decay(name, sub) else decay).append(p)
    groups = [{"params": decay, "weight_decay": fit.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **fit.optimizer_params)


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier at ``step``: transformers' schedules, which old_fit names."""
    if kind == "constantlr":
        return 1.0
    if step < warmup:  # every other schedule warms up linearly from 0
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "warmupconstant":
        return 1.0
    if kind == "warmuplinear":  # down to 0 at ``total``, written as transformers does (same rounding)
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "warmupcosine":  # half a cosine wave down to 0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if progress >= 1.0:  # warmupcosinewithhardrestarts, with one cycle
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))


def schedule(optimizer: torch.optim.Optimizer, fit: FitParams, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(fit.scheduler, step, fit.warmup_steps, total))


# ---------------------------------------------------------------------------------------------------
# The objectives


@dataclass
class Task:
    """An objective ready to train: its examples, its sampler's batches, its loss function."""
    examples: Examples
    batches: Sampler
    loss: object
    loss_params: dict


def build_tasks(recipe: Recipe, rng: random.Random) -> list[Task]:
    """Each objective's examples read, its sampler and loss ready."""
    out = []
    for i, o in enumerate(recipe.objectives):
        examples = read_examples(list(o.data), o.format, rng)
        sampler = Sampler(examples, o.batch_size, o.sampler, rng)
        if len(sampler) == 0:
            raise RecipeError(f"objectives[{i}]: {len(examples)} examples make no batch of {o.batch_size}")
        loss, params = get_loss(o.loss, o.loss_params)
        out.append(Task(examples, sampler, loss.fn, params))
    return out


# ---------------------------------------------------------------------------------------------------
# The training forward


def batch_loss(encoder: SentenceEncoder, objective: Task, batch: list[int]) -> torch.Tensor:
    """One objective's loss on one batch (example indices): all its columns embedded in one call."""
    columns = list(zip(*(objective.examples.texts[i] for i in batch)))  # K columns of B texts
    embeddings = encoder.embed_for_training([text for column in columns for text in column]).split(len(batch))
    labels = None
    if objective.examples.scores is not None:
        labels = torch.tensor([objective.examples.scores[i] for i in batch], dtype=torch.float32,
                              device=encoder.device)
    return objective.loss(list(embeddings), labels, **objective.loss_params)


# ---------------------------------------------------------------------------------------------------
# Evaluation and saving


@dataclass
class FitResult:
    losses: list[dict] = field(default_factory=list)  # one per objective and step: epoch, step, objective, loss, lr
    evaluations: list[dict] = field(default_factory=list)  # epoch, steps, the 8 figures, score
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0


def evaluate(encoder: SentenceEncoder, modules: list[nn.Module], pairs, output: Path | None, name: str,
             epoch: int, steps: int) -> dict:
    """The 8 STS figures in eval mode (as sentence-transformers' evaluator encodes), one CSV row."""
    for m in modules:
        m.eval()
    with torch.no_grad():  # the packed path's fused q/k/v weights are copies: rebuild them from the trained ones
        encoder.fast = encoder.fast
    figures = evaluate_sts(encoder, pairs.sentences1, pairs.sentences2, pairs.scores)
    for m in modules:
        m.train()
    row = {"epoch": epoch, "steps": steps, **{k: figures[k] for k in METRICS}}
    row["score"] = max(figures[k] for k in METRICS if k.endswith("_spearman"))
    if output is not None:
        path = output / "eval" / f"similarity_evaluation_{name}_results.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "steps", *METRICS])
            writer.writerow([epoch, steps, *(figures[k] for k in METRICS)])
    return row


# ---------------------------------------------------------------------------------------------------
# The fit loop


def fit(encoder: SentenceEncoder, recipe: Recipe, output: str | Path | None = None, seed: int | None = None,
        progress: bool = True) -> FitResult:
    """Train ``encoder`` in place with ``recipe``; write the model, the evaluation CSV and the loss log into
    ``output`` (None: write nothing). Returns the losses and evaluations."""
    # embed() runs the transformer, Pooling, Dense and Normalize: any other module with weights would be
    # skipped or left untrained.
    kinds = [type(m).__name__ for m in encoder.pipeline()[1:]
             if m not in encoder.dense and next(m.parameters(), None) is not None]
    if kinds:
        raise ConfigError(f"{encoder.source}: training a model with {', '.join(kinds)} modules is not implemented "
                          f"(fit trains the transformer and Dense modules)")
    seed = recipe.seed if seed is None else seed
    rng = random.Random(seed)  # data: KorNLI's partner draws, shuffles
    torch.manual_seed(seed)  # dropout
    output = Path(output) if output is not None else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    if recipe.max_seq_length is not None:
        encoder.max_seq_length = recipe.max_seq_length
    objectives = build_tasks(recipe, rng)
    pairs = read_sts(recipe.evaluator) if recipe.evaluator is not None else None
    eval_name = recipe.evaluator.stem if recipe.evaluator is not None else ""
    cfg = recipe.fit

    # The trainable modules: the transformer and any Dense after the pooling. The loader hands them
    # over frozen and in eval mode; training turns gradients and dropout on.
    modules = [encoder.model, *encoder.dense]
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]

    steps_per_epoch = cfg.steps_per_epoch or min(len(o.batches) for o in objectives)
    total = steps_per_epoch * cfg.epochs
    optimizers = [adamw(modules, cfg) for _ in objectives]
    schedulers = [schedule(opt, cfg, total) for opt in optimizers]
    streams = [iter(o.batches) for o in objectives]

    device = encoder.device
    amp_dtype, scaler = None, None
    if cfg.use_amp and device.type == "cuda":
        amp_dtype, scaler = torch.float16, torch.amp.GradScaler("cuda")
    elif cfg.use_amp and cpu_kind().native_bf16:
        amp_dtype = torch.bfloat16
    elif cfg.use_amp:
        log.warning("use_amp: this CPU has no native bf16 (AVX512_BF16 or AMX); training in float32")

    result = FitResult()
    loss_log = open(output / "train_loss.csv", "w", newline="", encoding="utf-8") if output is not None else None
    if loss_log is not None:
        csv.writer(loss_log).writerow(["epoch", "step", "objective", "loss", "lr"])
    bar = tqdm(total=total, desc="Training", unit="step", disable=not progress)
    start = time.perf_counter()
    step = 0
    try:
        for epoch in range(cfg.epochs):
            for epoch_step in range(1, steps_per_epoch + 1):
                step += 1
                for k, objective in enumerate(objectives):
                    optimizer, scheduler = optimizers[k], schedulers[k]
                    lr = scheduler.get_last_lr()[0]
                    batch = next(streams[k])
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = batch_loss(encoder, objective, batch)
                    skip_scheduler = False
                    if scaler is not None:
                        scale = scaler.get_scale()
                        scaler.scale(loss).backward()
                        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        scaler.step(optimizer)  # skipped if any gradient is inf or NaN
                        scaler.update()
                        skip_scheduler = scaler.get_scale() != scale  # old_fit's test for a skipped step
                    else:
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                    optimizer.zero_grad()
                    if not skip_scheduler:
                        scheduler.step()
                    record = {"epoch": epoch, "step": step, "objective": k, "loss": loss.item(), "lr": lr}
                    result.losses.append(record)
                    if loss_log is not None:
                        csv.writer(loss_log).writerow(record.values())
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]['loss']:.4f}")
                if pairs is not None and cfg.evaluation_steps and epoch_step % cfg.evaluation_steps == 0:
                    check_best(encoder, modules, pairs, output, eval_name, epoch, epoch_step, cfg, result)
            if pairs is not None:
                check_best(encoder, modules, pairs, output, eval_name, epoch, -1, cfg, result)
            if loss_log is not None:
                loss_log.flush()
    finally:
        bar.close()
        if loss_log is not None:
            loss_log.close()
        for m in modules:
            m.eval().requires_grad_(False)
        encoder.fast = encoder.fast  # rebuild the packed path from the trained weights
    result.steps, result.seconds = step, time.perf_counter() - start
    if pairs is None and output is not None:
        encoder.save(output)
    return result


def check_best(encoder, modules, pairs, output, name, epoch, steps, cfg, result) -> None:
    """Evaluate; save the model when its score beats the best so far (old_fit's ``_eval_during_training``)."""
    row = evaluate(encoder, modules, pairs, output, name, epoch, steps)
    result.evaluations.append(row)
    log.info("epoch %d, steps %d: cosine Spearman %.4f, score %.4f", epoch, steps, row["cosine_spearman"], row["score"])
    if result.best_score is None or row["score"] > result.best_score:
        result.best_score = row["score"]
        if cfg.save_best_model and output is not None:
            for m in modules:
                m.eval()
            encoder.save(output)
            for m in modules:
                m.train()


# ---------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model folder, short name from weights/models.json (e.g. all-MiniLM-L6-v2), or hub id")
    parser.add_argument("--recipe", required=True, help="recipe JSON (see recipes/ and docs/training.md)")
    parser.add_argument("--output", required=True, help="new or empty folder for the trained model and logs")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, help="random seed for data order and dropout (None: the recipe's seed)")


def run(args: argparse.Namespace) -> int:
    # Everything checkable fails before the model loads: device, recipe keys, data files, output folder.
    device = check_device(args.device)
    recipe = read_recipe(args.recipe)
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"--output {output}: exists and is not an empty folder")
    encoder = SentenceEncoder.from_pretrained(args.model, device=device)
    result = fit(encoder, recipe, output, seed=args.seed, progress=sys.stderr.isatty())
    print(f"{result.steps} steps in {result.seconds:.0f} s; model, eval/ and train_loss.csv in {output}",
          file=sys.stderr)
    if result.best_score is not None:
        print(f"best score (max Spearman) {result.best_score:.4f}", file=sys.stderr)
    return 0
