"""A training recipe: JSON read once, every key checked, into frozen dataclasses.

``max_seq_length``; ``objectives``, each ``{"data", "format", "loss", "loss_params", "batch_size",
"sampler"}``; ``fit``, the cards' "Parameters of the fit()-Method" block as printed; optionally
``evaluator`` (``{"data", "format": "korsts"}``), ``seed`` and ``description``. Errors name the file
and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from minisbert import checks
from minisbert.errors import RecipeError
from minisbert.train.data import SAMPLERS
from minisbert.train.losses import describe_columns, get_loss

# The fit block: old_fit's parameters and defaults. The cards print the first ten.
FIT_DEFAULTS = {
    "epochs": 1, "steps_per_epoch": None, "scheduler": "WarmupLinear", "warmup_steps": 10000,
    "optimizer_class": "AdamW", "optimizer_params": {"lr": 2e-5}, "weight_decay": 0.01,
    "evaluation_steps": 0, "evaluator": None, "max_grad_norm": 1, "use_amp": False, "save_best_model": True,
    "checkpoint_save_steps": 0, "checkpoint_save_total_limit": 0,  # 0: no training state; keep every one
}
SCHEDULERS = ("constantlr", "warmupconstant", "warmuplinear", "warmupcosine", "warmupcosinewithhardrestarts")
OPTIMIZER_PARAMS = ("lr", "eps", "betas")
# format -> (text columns per example, whether it has a score)
FORMAT_COLUMNS = {"korsts": (2, True), "kornli": (3, False), "triplets": (3, False), "pairs": (2, False),
                  "scored-pairs": (2, True), "dataset": None}  # dataset: the columns its header names


@dataclass(frozen=True)
class Objective:
    data: tuple[Path, ...]
    format: str
    loss: str
    loss_params: dict
    batch_size: int
    sampler: str


@dataclass(frozen=True)
class FitParams:
    epochs: int
    steps_per_epoch: int | None
    scheduler: str
    warmup_steps: int
    optimizer_params: dict
    weight_decay: float
    evaluation_steps: int
    max_grad_norm: float
    use_amp: bool
    save_best_model: bool
    checkpoint_save_steps: int = 0  # a training state (state.py) every that many steps; 0: none
    checkpoint_save_total_limit: int = 0  # the newest that many kept; 0: all


@dataclass(frozen=True)
class Recipe:
    objectives: tuple[Objective, ...]
    fit: FitParams
    max_seq_length: int | None = None  # None: the model's own
    evaluator: Path | None = None  # STS pairs (any format ``eval-sts`` reads)
    seed: int = 42
    description: str = ""


def read_recipe(path: str | Path) -> Recipe:
    """The recipe at ``path``, every key checked; relative data paths are taken from the current folder."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not a JSON file ({e})") from None
    return parse_recipe(raw, str(path))


def parse_recipe(raw: dict, where: str = "recipe") -> Recipe:
    """A recipe's JSON object, checked section by section; ``where`` (the file) begins every error."""
    check_object(raw, ("max_seq_length", "objectives", "fit", "evaluator", "seed", "description"), "recipe", where,
                 required=("objectives", "fit"))
    if not isinstance(raw["objectives"], list) or not raw["objectives"]:
        fail(where, "objectives", "must be a non-empty list")
    objectives = tuple(parse_objective(o, f"objectives[{i}]", where) for i, o in enumerate(raw["objectives"]))
    fit = parse_fit(raw["fit"], where)
    evaluator = parse_evaluator(raw["evaluator"], where) if raw.get("evaluator") is not None else None
    description = raw.get("description", "")
    if not isinstance(description, str):
        fail(where, "description", "must be a string")
    max_seq_length = raw.get("max_seq_length")
    if max_seq_length is not None:
        max_seq_length = integer(max_seq_length, "max_seq_length", where, low=2)
    seed = integer(raw.get("seed", 42), "seed", where, low=0)
    return Recipe(objectives, fit, max_seq_length, evaluator, seed, description)


def parse_objective(obj, key: str, where: str) -> Objective:
    """``objectives[i]``: its data files, a format whose columns the loss takes, the loss, batch size, sampler."""
    check_object(obj, ("data", "format", "loss", "loss_params", "batch_size", "sampler"), key, where,
                 required=("data", "format", "loss", "batch_size"))
    fmt = obj["format"]
    if fmt not in FORMAT_COLUMNS:
        fail(where, f"{key}.format", f"{fmt!r} is not one of {', '.join(FORMAT_COLUMNS)}")
    try:
        loss, _ = get_loss(obj["loss"], obj.get("loss_params", {}) or {})
    except ValueError as e:
        fail(where, f"{key}.loss", str(e))
    columns, scored = FORMAT_COLUMNS[fmt] or (None, None)  # a dataset is checked once read (loop.check_columns)
    if columns is not None and (columns not in loss.columns or scored != loss.scored):
        fail(where, f"{key}.format", f"{fmt!r} gives {columns} texts{' and a score' if scored else ''} per example; "
                                     f"{obj['loss']} takes {describe_columns(loss.columns)} texts"
                                     f"{' and a score' if loss.scored else ' and no score'}")
    sampler = obj.get("sampler", "sequential")
    if sampler not in SAMPLERS:
        fail(where, f"{key}.sampler", f"{sampler!r} is not one of {', '.join(SAMPLERS)}")
    # The params as written (checked above; the loop resolves them again, a guide's name into a model).
    return Objective(paths(obj["data"], f"{key}.data", where), fmt, obj["loss"], dict(obj.get("loss_params") or {}),
                     integer(obj["batch_size"], f"{key}.batch_size", where), sampler)


def parse_fit(fit, where: str) -> FitParams:
    """The ``fit`` block over old_fit's defaults; the classes it names must be the ones implemented."""
    check_object(fit, tuple(FIT_DEFAULTS), "fit", where)
    fit = {**FIT_DEFAULTS, **fit}
    scheduler = fit["scheduler"]
    if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS:
        fail(where, "fit.scheduler", f"{scheduler!r} is not one of ConstantLR, WarmupConstant, WarmupLinear, "
                                     f"WarmupCosine, WarmupCosineWithHardRestarts")
    # The cards print the class ("<class 'torch.optim.adamw.AdamW'>", transformers' AdamW, or "" when the
    # page dropped the angle brackets); every one of them is AdamW.
    optimizer_class = fit["optimizer_class"]
    if optimizer_class is not None and "AdamW" not in optimizer_class and optimizer_class != "":
        fail(where, "fit.optimizer_class", f"{optimizer_class!r}: only AdamW is implemented")
    if fit["evaluator"] and "EmbeddingSimilarityEvaluator" not in str(fit["evaluator"]):
        fail(where, "fit.evaluator", f"{fit['evaluator']!r}: only EmbeddingSimilarityEvaluator is implemented")
    optimizer_params = parse_optimizer_params(fit["optimizer_params"], where)
    for name in ("use_amp", "save_best_model"):
        if not isinstance(fit[name], bool):
            fail(where, f"fit.{name}", f"{fit[name]!r} must be true or false")
    steps_per_epoch = fit["steps_per_epoch"] or None  # old_fit: None or 0 means the shortest objective
    return FitParams(
        epochs=integer(fit["epochs"], "fit.epochs", where),
        steps_per_epoch=None if steps_per_epoch is None else integer(steps_per_epoch, "fit.steps_per_epoch", where),
        scheduler=scheduler.lower(),
        warmup_steps=integer(fit["warmup_steps"], "fit.warmup_steps", where, low=0),
        optimizer_params=optimizer_params,
        weight_decay=number(fit["weight_decay"], "fit.weight_decay", where),
        evaluation_steps=integer(fit["evaluation_steps"], "fit.evaluation_steps", where, low=0),
        max_grad_norm=number(fit["max_grad_norm"], "fit.max_grad_norm", where),
        use_amp=fit["use_amp"], save_best_model=fit["save_best_model"],
        checkpoint_save_steps=integer(fit["checkpoint_save_steps"], "fit.checkpoint_save_steps", where, low=0),
        checkpoint_save_total_limit=integer(fit["checkpoint_save_total_limit"], "fit.checkpoint_save_total_limit",
                                            where, low=0))


def parse_optimizer_params(params, where: str) -> dict:
    """``fit.optimizer_params``: AdamW's ``lr`` (default 2e-5), ``eps`` and ``betas``."""
    check_object(params, OPTIMIZER_PARAMS, "fit.optimizer_params", where)
    out = dict(params)
    out["lr"] = number(params.get("lr", 2e-5), "fit.optimizer_params.lr", where)
    if "eps" in params:
        out["eps"] = number(params["eps"], "fit.optimizer_params.eps", where)
    if "betas" in params:
        betas = params["betas"]
        if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)):
            fail(where, "fit.optimizer_params.betas", f"{betas!r} must be a list of two numbers")
        out["betas"] = tuple(float(b) for b in betas)
    return out


def parse_evaluator(evaluator, where: str) -> Path:
    """``evaluator``: one file of STS pairs."""
    check_object(evaluator, ("data", "format"), "evaluator", where, required=("data",))
    if evaluator.get("format", "korsts") != "korsts":
        fail(where, "evaluator.format", f"{evaluator['format']!r}: only korsts (STS pairs) is implemented")
    return paths(evaluator["data"], "evaluator.data", where)[0]


# ---------------------------------------------------------------------------------------------------
# Checks of one value; each error reads "<where>: <key>: <what is wrong>"


def fail(where: str, key: str, message: str) -> NoReturn:
    raise RecipeError(f"{where}: {key}: {message}")


def check_object(obj, allowed: tuple[str, ...], key: str, where: str, required: tuple[str, ...] = ()) -> None:
    """``obj`` is a JSON object with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(obj, dict):
        fail(where, key, f"must be a JSON object, got {type(obj).__name__}")
    checks.unknown_keys(obj, allowed, key, where=where, error=RecipeError)
    missing = [k for k in required if k not in obj]
    if missing:
        fail(where, key, f"missing keys {missing}")


def integer(value, key: str, where: str, low: int = 1) -> int:
    return checks.integer(value, key, low, where=where, error=RecipeError)


def number(value, key: str, where: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        fail(where, key, f"{value!r} must be a number >= {low}")
    return float(value)


def paths(value, key: str, where: str) -> tuple[Path, ...]:
    """One file path or a list of them, each an existing file."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        fail(where, key, f"{value!r} must be a file path or a list of them")
    for v in values:
        if not Path(v).is_file():
            fail(where, key, f"{v}: no such file (fill in the recipe's data paths)")
    return tuple(Path(v) for v in values)
