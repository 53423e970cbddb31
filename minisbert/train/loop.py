"""Fine-tuning as sentence-transformers' legacy ``fit`` (``old_fit``) trains, step for step.

    python -m minisbert train --model all-MiniLM-L6-v2 --recipe recipes/klue-sroberta-sts.json --output out

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
embedded in groups of equal padded length (``runner.embed_padded``, as inference), instead of each
column padded to its own longest; the linears then run on ~1.5x fewer padded positions at
KorSTS's lengths. Groups change only the order of float sums (``tests/test_train.py`` holds the
steps to ``old_fit``'s within rounding).

The output folder gets the model (sentence-transformers layout), ``eval/similarity_evaluation_*_results.csv``
(sentence-transformers' columns) and ``train_loss.csv`` (every objective's loss and learning rate per step).

``fit`` comes first; below it the objectives' batches and the AMP setting. Beside it: ``optim.py`` (AdamW
groups, schedules), ``evaluate.py`` (STS scoring, the CSV, saving the best), ``logs.py`` (loss log,
progress), ``command.py`` (``minisbert train``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minisbert.encoder import SentenceEncoder
from minisbert.fast.cpu import cpu_kind
from minisbert.train.data import Examples, Sampler, read_examples
from minisbert.train.evaluate import Evaluator
from minisbert.train.logs import LossLog, Progress
from minisbert.train.losses import get_loss
from minisbert.train.optim import adamw, schedule
from minisbert.train.recipe import Recipe, RecipeError

log = logging.getLogger("minisbert")


@dataclass
class FitResult:
    losses: list[dict] = field(default_factory=list)  # one per objective and step: epoch, step, objective, loss, lr
    evaluations: list[dict] = field(default_factory=list)  # epoch, steps, the 8 figures, score
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0


def fit(encoder: SentenceEncoder, recipe: Recipe, output: str | Path | None = None, seed: int | None = None,
        progress: bool = True) -> FitResult:
    """Train ``encoder`` in place with ``recipe``; write the model, the evaluation CSV and the loss log into
    ``output`` (None: write nothing). ``progress``: a bar on a terminal, else a line every few steps on
    stderr (``logs.Progress``). Returns the losses and evaluations."""
    modules = encoder.trainable_modules()  # the transformer and any Dense; refuses models with others
    params = [p for m in modules for p in m.parameters()]
    seed = recipe.seed if seed is None else seed
    rng = random.Random(seed)  # data: KorNLI's partner draws, shuffles
    torch.manual_seed(seed)  # dropout
    output = Path(output) if output is not None else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    if recipe.max_seq_length is not None:
        encoder.max_seq_length = recipe.max_seq_length
    tasks = build_tasks(recipe, rng)
    cfg = recipe.fit
    evaluator = Evaluator(recipe.evaluator, output, cfg.save_best_model) if recipe.evaluator is not None else None

    steps_per_epoch = cfg.steps_per_epoch or min(len(t.batches) for t in tasks)
    total = steps_per_epoch * cfg.epochs
    optimizers = [adamw(modules, cfg) for _ in tasks]  # each objective keeps its own moments and schedule
    schedulers = [schedule(opt, cfg, total) for opt in optimizers]
    streams = [iter(t.batches) for t in tasks]
    device = encoder.device
    amp_dtype, scaler = precision(cfg.use_amp, device)

    result = FitResult()
    start, step = time.perf_counter(), 0
    with encoder.mode(train=True), LossLog(output) as loss_log, Progress(total, progress) as bar:
        for epoch in range(cfg.epochs):
            for epoch_step in range(1, steps_per_epoch + 1):
                step += 1
                for k, task in enumerate(tasks):  # one batch of each objective, in turn
                    optimizer, scheduler = optimizers[k], schedulers[k]
                    lr = scheduler.get_last_lr()[0]
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = batch_loss(encoder, task, next(streams[k]))
                    scale = scaler.get_scale()  # 1.0 when the scaler is off
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    scaler.step(optimizer)  # skipped if any gradient is inf or NaN
                    scaler.update()
                    optimizer.zero_grad()
                    if scaler.get_scale() == scale:  # old_fit: a changed scale means a skipped step
                        scheduler.step()
                    record = {"epoch": epoch, "step": step, "objective": k, "loss": loss.item(), "lr": lr}
                    result.losses.append(record)
                    loss_log.write(record)
                bar.update(step, result.losses[-len(tasks):])
                if evaluator is not None and cfg.evaluation_steps and epoch_step % cfg.evaluation_steps == 0:
                    evaluator(encoder, epoch, epoch_step)
            if evaluator is not None:
                evaluator(encoder, epoch, -1)  # and at each epoch's end, as old_fit
            loss_log.flush()
    # Out of mode(): eval mode, gradients off, the packed path rebuilt from the trained weights.
    result.steps, result.seconds = step, time.perf_counter() - start
    if evaluator is not None:
        result.evaluations, result.best_score = evaluator.rows, evaluator.best
    elif output is not None:
        encoder.save(output)  # without an evaluator, the final model
    return result


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


def batch_loss(encoder: SentenceEncoder, task: Task, batch: list[int]) -> torch.Tensor:
    """One objective's loss on one batch (example indices): all its columns embedded in one call."""
    columns = list(zip(*(task.examples.texts[i] for i in batch)))  # K columns of B texts
    embeddings = encoder.embed_for_training([text for column in columns for text in column]).split(len(batch))
    labels = None
    if task.examples.scores is not None:
        labels = torch.tensor([task.examples.scores[i] for i in batch], dtype=torch.float32, device=encoder.device)
    return task.loss(list(embeddings), labels, **task.loss_params)


# ---------------------------------------------------------------------------------------------------
# Mixed precision


def precision(use_amp: bool, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype (None: float32) and the gradient scaler, enabled for fp16 only. A disabled scaler
    passes the loss, ``unscale_`` and ``step`` straight through (its scale is 1.0 and never changes), so
    float32 and AMP run the same lines of the loop."""
    if not use_amp:
        dtype = None
    elif device.type == "cuda":
        dtype = torch.float16
    elif cpu_kind().native_bf16:
        dtype = torch.bfloat16  # bf16 has fp32's exponent range: nothing to scale
    else:
        log.warning("use_amp: this CPU has no native bf16 (AVX512_BF16 or AMX); training in float32")
        dtype = None
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
