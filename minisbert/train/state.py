"""Resumable training: the state of a run, saved every ``checkpoint_save_steps`` steps and restored by
``minisbert train --resume``.

``OUT/checkpoints/state-<step>.pt`` holds, after step ``step`` (every objective's batch of it done):
the trainable weights, every objective's AdamW moments and schedule, the loss scaler, the evaluator's
rows and best score, the random states (torch's for dropout, Matryoshka's draws) and the step. Each is
written to a temporary file and renamed into place (``io.files.atomic_path``): a run killed while
writing leaves the previous state whole. The newest ``checkpoint_save_total_limit`` are kept (0: all).

The samplers are not pickled: they are streams of index lists drawn from the data's random stream. On
resume the run is rebuilt from its seed and each stream replays the ``step`` batches it had given
(no text embedded), which leaves the samplers and the data's random stream exactly where they were.
A state records the recipe (as parsed) and the model it trained from; a resume with another is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from minisbert.errors import RecipeError
from minisbert.io.files import atomic_path


def recipe_key(recipe) -> str:
    """The recipe as parsed, as text: what a resumed run must match."""
    return json.dumps(dataclasses.asdict(recipe), default=str, sort_keys=True)


class TrainingState:
    def __init__(self, output: Path | None, recipe, model_name: str | None, rank: int = 0):
        self.folder = output / "checkpoints" if output is not None else None
        self.recipe, self.model_name, self.rank = recipe, model_name, rank
        self.limit = recipe.fit.checkpoint_save_total_limit

    def paths(self) -> list[Path]:
        """The saved states, oldest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("state-*.pt"), key=lambda p: int(p.stem.split("-")[1]))

    def save(self, trained: dict, step: int) -> None:
        """The state after ``step`` (rank 0 writes; every rank holds the same weights and moments)."""
        if self.folder is None or self.rank != 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        evaluator = trained["evaluator"]
        state = {
            "step": step, "recipe": recipe_key(self.recipe), "model": self.model_name,
            "modules": [m.state_dict() for m in trained["modules"]],
            "optimizers": [o.state_dict() for o in trained["optimizers"]],
            "schedulers": [s.state_dict() for s in trained["schedulers"]],
            "scaler": trained["scaler"].state_dict(),
            "evaluator": None if evaluator is None else {"rows": evaluator.rows, "best": evaluator.best},
            "torch_rng": torch.get_rng_state(), "loss_rng": trained["loss_rng"].getstate(),
        }
        with atomic_path(self.folder / f"state-{step}.pt", fsync=True) as tmp:
            torch.save(state, tmp)
        if self.limit:
            for old in self.paths()[:-self.limit]:
                old.unlink(missing_ok=True)

    def restore(self, trained: dict, streams: list) -> int:
        """The newest state loaded into ``trained`` and the samplers replayed; the step it was saved at."""
        paths = self.paths()
        if not paths:
            raise RecipeError(f"--resume: no training state in {self.folder} (checkpoint_save_steps writes one)")
        state = torch.load(paths[-1], map_location="cpu", weights_only=False)
        if state["recipe"] != recipe_key(self.recipe):
            raise RecipeError(f"--resume: {paths[-1]} was trained with another recipe")
        if self.model_name is not None and state["model"] != self.model_name:
            raise RecipeError(f"--resume: {paths[-1]} was trained from {state['model']!r}, not {self.model_name!r}")
        for m, s in zip(trained["modules"], state["modules"]):
            m.load_state_dict(s)
        for o, s in zip(trained["optimizers"], state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(trained["schedulers"], state["schedulers"]):
            sch.load_state_dict(s)
        trained["scaler"].load_state_dict(state["scaler"])
        if trained["evaluator"] is not None and state["evaluator"] is not None:
            trained["evaluator"].rows = state["evaluator"]["rows"]
            trained["evaluator"].best = state["evaluator"]["best"]
            trained["evaluator"].rewrite()  # its CSV without evaluations after the state
        for _ in range(state["step"]):  # the round robin's draws, in its order
            for stream in streams:
                next(stream)
        if self.rank == 0:
            torch.set_rng_state(state["torch_rng"])
        trained["loss_rng"].setstate(state["loss_rng"])
        return state["step"]

