"""A training recipe: JSON read once, every key checked, into frozen dataclasses.

``max_seq_length``; ``objectives``, each ``{"data", "format", "loss", "loss_params", "batch_size",
"sampler"}``; ``fit``, the cards' "Parameters of the fit()-Method" block as printed; optionally
``evaluator`` (``{"data", "format": "korsts"}``), ``seed`` and ``description``. Errors name the file
and the key.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from minisbert import checks
from minisbert.checks import unknown_keys
from minisbert.errors import RecipeError
from minisbert.train.losses import get_loss

log = logging.getLogger("minisbert")

# The fit block: old_fit's parameters and defaults. The cards print the first ten.
FIT_DEFAULTS = {
    "epochs": 1, "steps_per_epoch": None, "scheduler": "WarmupLinear", "warmup_steps": 10000,
    "optimizer_class": "AdamW", "optimizer_params": {"lr": 2e-5}, "weight_decay": 0.01,
    "evaluation_steps": 0, "evaluator": None, "max_grad_norm": 1, "use_amp": False, "save_best_model": True,
}
SCHEDULERS = ("constantlr", "warmupconstant", "warmuplinear", "warmupcosine", "warmupcosinewithhardrestarts")
OPTIMIZER_PARAMS = ("lr", "eps", "betas")


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
    def fail(key: str, message: str):
        raise RecipeError(f"{where}: {key}: {message}")

    def check_keys(obj, allowed, key: str, required=()):
        if not isinstance(obj, dict):
            fail(key, f"must be a JSON object, got {type(obj).__name__}")
        unknown_keys(obj, allowed, key, where=where, error=RecipeError)
        missing = [k for k in required if k not in obj]
        if missing:
            fail(key, f"missing keys {missing}")

    def integer(value, key: str, low: int = 1):
        return checks.integer(value, key, low, where=where, error=RecipeError)

    def number(value, key: str, low: float = 0.0):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            fail(key, f"{value!r} must be a number >= {low}")
        return float(value)

    def paths(value, key: str) -> tuple[Path, ...]:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            fail(key, f"{value!r} must be a file path or a list of them")
        for v in values:
            if not Path(v).is_file():
                fail(key, f"{v}: no such file (fill in the recipe's data paths)")
        return tuple(Path(v) for v in values)

    check_keys(raw, ("max_seq_length", "objectives", "fit", "evaluator", "seed", "description"), "recipe",
               required=("objectives", "fit"))
    objectives = []
    if not isinstance(raw["objectives"], list) or not raw["objectives"]:
        fail("objectives", "must be a non-empty list")
    for i, obj in enumerate(raw["objectives"]):
        key = f"objectives[{i}]"
        check_keys(obj, ("data", "format", "loss", "loss_params", "batch_size", "sampler"), key,
                   required=("data", "format", "loss", "batch_size"))
        fmt = obj["format"]
        if fmt not in FORMAT_COLUMNS:
            fail(f"{key}.format", f"{fmt!r} is not one of {', '.join(FORMAT_COLUMNS)}")
        try:
            loss, params = get_loss(obj["loss"], obj.get("loss_params", {}) or {})
        except ValueError as e:
            fail(f"{key}.loss", str(e))
        columns, scored = FORMAT_COLUMNS[fmt]
        if columns not in loss.columns or scored != loss.scored:
            fail(f"{key}.format", f"{fmt!r} gives {columns} texts{' and a score' if scored else ''} per example; "
                                  f"{obj['loss']} takes {' or '.join(map(str, loss.columns))} texts"
                                  f"{' and a score' if loss.scored else ' and no score'}")
        sampler = obj.get("sampler", "sequential")
        if sampler not in ("sequential", "shuffle", "no_duplicates"):
            fail(f"{key}.sampler", f"{sampler!r} is not one of sequential, shuffle, no_duplicates")
        objectives.append(Objective(paths(obj["data"], f"{key}.data"), fmt, obj["loss"], params,
                                    integer(obj["batch_size"], f"{key}.batch_size"), sampler))

    fit = raw["fit"]
    check_keys(fit, tuple(FIT_DEFAULTS), "fit")
    fit = {**FIT_DEFAULTS, **fit}
    scheduler = fit["scheduler"]
    if not isinstance(scheduler, str) or scheduler.lower() not in SCHEDULERS:
        fail("fit.scheduler", f"{scheduler!r} is not one of ConstantLR, WarmupConstant, WarmupLinear, WarmupCosine, "
                              f"WarmupCosineWithHardRestarts")
    # The cards print the class ("<class 'torch.optim.adamw.AdamW'>", transformers' AdamW, or "" when the
    # page dropped the angle brackets); every one of them is AdamW.
    if fit["optimizer_class"] is not None and "AdamW" not in fit["optimizer_class"] and fit["optimizer_class"] != "":
        fail("fit.optimizer_class", f"{fit['optimizer_class']!r}: only AdamW is implemented")
    evaluator_class = fit["evaluator"]
    if evaluator_class and "EmbeddingSimilarityEvaluator" not in str(evaluator_class):
        fail("fit.evaluator", f"{evaluator_class!r}: only EmbeddingSimilarityEvaluator is implemented")
    check_keys(fit["optimizer_params"], OPTIMIZER_PARAMS, "fit.optimizer_params")
    optimizer_params = dict(fit["optimizer_params"])
    optimizer_params["lr"] = number(optimizer_params.get("lr", 2e-5), "fit.optimizer_params.lr")
    if "eps" in optimizer_params:
        optimizer_params["eps"] = number(optimizer_params["eps"], "fit.optimizer_params.eps")
    if "betas" in optimizer_params:
        betas = optimizer_params["betas"]
        if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)):
            fail("fit.optimizer_params.betas", f"{betas!r} must be a list of two numbers")
        optimizer_params["betas"] = tuple(float(b) for b in betas)
    for name in ("use_amp", "save_best_model"):
        if not isinstance(fit[name], bool):
            fail(f"fit.{name}", f"{fit[name]!r} must be true or false")
    steps_per_epoch = fit["steps_per_epoch"] or None  # old_fit: None or 0 means the shortest objective
    params = FitParams(
        epochs=integer(fit["epochs"], "fit.epochs"),
        steps_per_epoch=None if steps_per_epoch is None else integer(steps_per_epoch, "fit.steps_per_epoch"),
        scheduler=scheduler.lower(),
        warmup_steps=integer(fit["warmup_steps"], "fit.warmup_steps", low=0),
        optimizer_params=optimizer_params,
        weight_decay=number(fit["weight_decay"], "fit.weight_decay"),
        evaluation_steps=integer(fit["evaluation_steps"], "fit.evaluation_steps", low=0),
        max_grad_norm=number(fit["max_grad_norm"], "fit.max_grad_norm"),
        use_amp=fit["use_amp"], save_best_model=fit["save_best_model"])

    evaluator = None
    if raw.get("evaluator") is not None:
        check_keys(raw["evaluator"], ("data", "format"), "evaluator", required=("data",))
        if raw["evaluator"].get("format", "korsts") != "korsts":
            fail("evaluator.format", f"{raw['evaluator']['format']!r}: only korsts (STS pairs) is implemented")
        evaluator = paths(raw["evaluator"]["data"], "evaluator.data")[0]
    max_seq_length = raw.get("max_seq_length")
    seed = raw.get("seed", 42)
    description = raw.get("description", "")
    if not isinstance(description, str):
        fail("description", "must be a string")
    if max_seq_length is not None:
        max_seq_length = integer(max_seq_length, "max_seq_length", low=2)
    return Recipe(tuple(objectives), params, max_seq_length, evaluator, integer(seed, "seed", low=0), description)


# format -> (text columns per example, whether it has a score)
FORMAT_COLUMNS = {"korsts": (2, True), "kornli": (3, False), "triplets": (3, False), "pairs": (2, False),
                  "scored-pairs": (2, True)}
