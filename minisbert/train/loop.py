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

Beyond old_fit, in the same loop: a Cached loss runs its own backward passes (``cached.py``) where the
others call ``backward``; under torchrun each rank takes its shard of every global batch and the
gradients are averaged before clipping (``distributed.py``); every ``checkpoint_save_steps`` steps the
training state is saved, and ``resume`` starts from it (``state.py``).

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
from minisbert.train import distributed
from minisbert.train.cached import cached_backward
from minisbert.train.data import Examples, Sampler, read_examples
from minisbert.train.evaluate import Evaluator
from minisbert.train.logs import LossLog, Progress
from minisbert.train.losses import Loss, call_params, describe_columns, get_loss, loop_param
from minisbert.train.optim import adamw, schedule
from minisbert.train.recipe import Recipe, RecipeError
from minisbert.train.state import TrainingState

log = logging.getLogger("minisbert")


@dataclass
class FitResult:
    losses: list[dict] = field(default_factory=list)  # one per objective and step: epoch, step, objective, loss, lr
    evaluations: list[dict] = field(default_factory=list)  # epoch, steps, the 8 figures, score
    best_score: float | None = None
    steps: int = 0
    seconds: float = 0.0


def fit(encoder: SentenceEncoder, recipe: Recipe, output: str | Path | None = None, seed: int | None = None,
        progress: bool = True, resume: bool = False, model_name: str | None = None) -> FitResult:
    """Train ``encoder`` in place with ``recipe``; write the model, the evaluation CSV and the loss log into
    ``output`` (None: write nothing). ``progress``: a bar on a terminal, else a line every few steps on
    stderr (``logs.Progress``). ``resume``: continue from the newest training state in ``output``
    (``state.py``; ``model_name`` is what the state must have been trained from). Under ``torchrun`` each
    rank trains its shard of every batch and rank 0 alone evaluates, logs and saves. Returns the losses
    and evaluations."""
    rank, size = distributed.world()
    modules = encoder.trainable_modules()  # the transformer and any Dense; refuses models with others
    params = [p for m in modules for p in m.parameters()]
    seed = recipe.seed if seed is None else seed
    rng = random.Random(seed)  # data: KorNLI's partner draws, shuffles; the same on every rank
    loss_rng = random.Random(seed + 1)  # MatryoshkaLoss's draws of dims, apart so resume can restore it
    torch.manual_seed(seed + rank)  # dropout, a stream of its own on each rank
    output = Path(output) if output is not None else None
    writes = output if rank == 0 else None  # where this rank writes: rank 0 alone
    if writes is not None:
        writes.mkdir(parents=True, exist_ok=True)
    if recipe.max_seq_length is not None:
        encoder.max_seq_length = recipe.max_seq_length
    tasks = build_tasks(recipe, rng, size, encoder.device)
    cfg = recipe.fit
    evaluator = Evaluator(recipe.evaluator, writes, cfg.save_best_model) \
        if recipe.evaluator is not None and rank == 0 else None

    steps_per_epoch = cfg.steps_per_epoch or min(len(t.batches) for t in tasks)
    total = steps_per_epoch * cfg.epochs
    optimizers = [adamw(modules, cfg) for _ in tasks]  # each objective keeps its own moments and schedule
    schedulers = [schedule(opt, cfg, total) for opt in optimizers]
    streams = [iter(t.batches) for t in tasks]
    device = encoder.device
    amp_dtype, scaler = precision(cfg.use_amp, device)
    states = TrainingState(output, recipe, model_name, rank)
    trained = dict(modules=modules, optimizers=optimizers, schedulers=schedulers, scaler=scaler,
                   evaluator=evaluator, loss_rng=loss_rng)

    result = FitResult()
    step = states.restore(trained, streams) if resume else 0  # the samplers replayed to where it stopped
    start = time.perf_counter()
    with encoder.mode(train=True), LossLog(writes, step) as loss_log, Progress(total, progress and rank == 0) as bar:
        for epoch in range(step // steps_per_epoch, cfg.epochs):
            for epoch_step in range(step % steps_per_epoch + 1, steps_per_epoch + 1):
                step += 1
                for k, task in enumerate(tasks):  # one batch of each objective, in turn
                    optimizer, scheduler = optimizers[k], schedulers[k]
                    lr = scheduler.get_last_lr()[0]
                    batch = distributed.shard(next(streams[k]), rank, size)  # this rank's part
                    scale = scaler.get_scale()  # 1.0 when the scaler is off
                    if task.mini_batch_size is not None:  # gradient caching does its own backward passes
                        factor = scaler.scale(torch.ones((), device=device)).item()  # (and starts the scaler)
                        loss = cached_loss(encoder, task, batch, amp_dtype, factor, loss_rng)
                    else:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss = batch_loss(encoder, task, batch, loss_rng)
                        scaler.scale(loss).backward()
                    distributed.average_gradients(params)  # every rank steps with the mean gradient
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    scaler.step(optimizer)  # skipped if any gradient is inf or NaN
                    scaler.update()
                    optimizer.zero_grad()
                    if scaler.get_scale() == scale:  # old_fit: a changed scale means a skipped step
                        scheduler.step()
                    record = {"epoch": epoch, "step": step, "objective": k,
                              "loss": distributed.mean_across(loss.item()), "lr": lr}
                    result.losses.append(record)
                    loss_log.write(record)
                bar.update(step, result.losses[-len(tasks):])
                if evaluator is not None and cfg.evaluation_steps and epoch_step % cfg.evaluation_steps == 0:
                    evaluator(encoder, epoch, epoch_step)
                if cfg.checkpoint_save_steps and step % cfg.checkpoint_save_steps == 0:
                    loss_log.flush()
                    states.save(trained, step)
            if evaluator is not None:
                evaluator(encoder, epoch, -1)  # and at each epoch's end, as old_fit
            loss_log.flush()
    # Out of mode(): eval mode, gradients off, the packed path rebuilt from the trained weights.
    result.steps, result.seconds = step, time.perf_counter() - start
    if evaluator is not None:
        result.evaluations, result.best_score = evaluator.rows, evaluator.best
    elif writes is not None:
        encoder.save(writes)  # without an evaluator, the final model
    return result


# ---------------------------------------------------------------------------------------------------
# The objectives


@dataclass
class Task:
    """An objective ready to train: its examples, its sampler's batches, its loss function and params,
    and the loop's part of a loss: the guide model (GIST), the mini-batch size (a Cached loss)."""
    examples: Examples
    batches: Sampler
    loss: object
    loss_params: dict
    guide: SentenceEncoder | None = None
    mini_batch_size: int | None = None


def build_tasks(recipe: Recipe, rng: random.Random, ranks: int = 1, device: torch.device | None = None) -> list[Task]:
    """Each objective's examples read, its sampler (of global batches: ``ranks`` x the recipe's batch
    size) and loss ready, its guide loaded (one load per name)."""
    out, guides = [], {}
    for i, o in enumerate(recipe.objectives):
        examples = read_examples(list(o.data), o.format, rng)
        loss, params = get_loss(o.loss, o.loss_params)
        check_columns(examples, loss, o, i)
        sampler = Sampler(examples, o.batch_size * ranks, o.sampler, rng, drop_last=ranks > 1)
        if len(sampler) == 0:
            raise RecipeError(f"objectives[{i}]: {len(examples)} examples make no batch of {o.batch_size * ranks}")
        guide, mini = loop_param(params, "guide"), loop_param(params, "mini_batch_size")
        if loss.guided and guide not in guides:
            guides[guide] = SentenceEncoder.from_pretrained(guide, device=device or "cpu")
        if loss.cached and mini is None:
            mini = 32  # sentence-transformers' default
        out.append(Task(examples, sampler, loss.fn, call_params(params), guides.get(guide), mini))
    return out


def check_columns(examples: Examples, loss: Loss, objective, i: int) -> None:
    """A file read by its header (``dataset``) is checked against the loss once read."""
    columns, scored = len(examples.texts[0]) if len(examples) else 2, examples.scores is not None
    if columns not in loss.columns or scored != loss.scored:
        raise RecipeError(f"objectives[{i}]: {objective.data[0]} gives {columns} texts"
                          f"{' and a score' if scored else ''} per example; {objective.loss} takes "
                          f"{describe_columns(loss.columns)} texts{' and a score' if loss.scored else ' and no score'}")


def labels_of(encoder: SentenceEncoder, task: Task, batch: list[int]) -> torch.Tensor | None:
    if task.examples.scores is None:
        return None
    return torch.tensor([task.examples.scores[i] for i in batch], dtype=torch.float32, device=encoder.device)


def extras(task: Task, columns: list[list[str]], loss_rng: random.Random | None, mini_batch_size: int | None = None
           ) -> dict:
    """What the loss function takes beside the embeddings: the guide's embeddings (no gradients, the
    guide in eval mode; in mini-batches for a Cached loss) and the Matryoshka draw's random stream."""
    out = {"rng": loss_rng} if "matryoshka_dims" in task.loss_params else {}
    if task.guide is not None:
        with torch.no_grad():
            step = mini_batch_size or max(map(len, columns))
            out["guide_embeddings"] = [torch.cat([task.guide.embed_for_training(column[s: s + step])
                                                  for s in range(0, len(column), step)]) for column in columns]
    return out


def batch_loss(encoder: SentenceEncoder, task: Task, batch: list[int],
               loss_rng: random.Random | None = None) -> torch.Tensor:
    """One objective's loss on one batch (example indices): all its columns embedded in one call."""
    columns = [list(c) for c in zip(*(task.examples.texts[i] for i in batch))]  # K columns of B texts
    embeddings = encoder.embed_for_training([text for column in columns for text in column]).split(len(batch))
    return task.loss(list(embeddings), labels_of(encoder, task, batch), **task.loss_params,
                     **extras(task, columns, loss_rng))


def cached_loss(encoder: SentenceEncoder, task: Task, batch: list[int], amp_dtype: torch.dtype | None,
                grad_scale: float, loss_rng: random.Random | None = None) -> torch.Tensor:
    """A Cached loss on one batch, its backward done (``cached.py``); the loss value returned."""
    columns = [list(c) for c in zip(*(task.examples.texts[i] for i in batch))]
    labels, extra = labels_of(encoder, task, batch), extras(task, columns, loss_rng, task.mini_batch_size)
    device = encoder.device
    return cached_backward(
        encoder.embed_for_training, columns, lambda e: task.loss(e, labels, **task.loss_params, **extra),
        task.mini_batch_size, device, grad_scale,
        lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None))


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
