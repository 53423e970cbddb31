"""Resume: a real ``minisbert train`` process killed (SIGKILL) right after its second training state is
written, mid-epoch, then ``minisbert train --resume``, ends with the weights, loss log and evaluations
of an unkilled run (dropout off); a resume with another recipe or model is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, corpus, make_checkpoint
from safetensors.torch import load_file
from test_train import NO_DROPOUT, korsts_file

KILL_AFTER_SECOND_STATE = """
import os, signal, sys
from minisbert.train import state
save = state.TrainingState.save
def killing_save(self, trained, step):
    save(self, trained, step)
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
state.TrainingState.save = killing_save
from minisbert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def minisbert(*args: str, kill: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", KILL_AFTER_SECOND_STATE] if kill else [sys.executable, "-m", "minisbert"]
    return subprocess.run(command + list(args), env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_checkpoint(root / "bert", "bert", config=NO_DROPOUT)
    texts = [t.replace("\t", " ") for t in corpus(120, seed=2)]
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i in range(48):
            f.write(json.dumps({"anchor": texts[2 * i], "positive": texts[2 * i + 1]}, ensure_ascii=False) + "\n")
    dev = korsts_file(root / "dev.tsv", texts[96:], n=12)
    raw = {"objectives": [{"data": str(root / "pairs.jsonl"), "format": "dataset",
                           "loss": "MultipleNegativesRankingLoss", "batch_size": 8, "sampler": "shuffle"}],
           "fit": {"epochs": 2, "warmup_steps": 2, "optimizer_params": {"lr": 1e-3}, "evaluation_steps": 4,
                   "checkpoint_save_steps": 2, "checkpoint_save_total_limit": 2}, "evaluator": {"data": str(dev)}}
    (root / "recipe.json").write_text(json.dumps(raw), encoding="utf-8")
    return root, model, raw


def test_killed_and_resumed_equals_unkilled(setup):
    root, model, _ = setup
    common = ["train", "--model", str(model), "--recipe", str(root / "recipe.json")]
    full = minisbert(*common, "--output", str(root / "full"))
    assert full.returncode == 0, full.stderr
    killed = minisbert(*common, "--output", str(root / "killed"), kill=True)
    assert killed.returncode == -9, killed.stderr  # SIGKILL, mid-epoch (6 steps an epoch)
    states = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    assert states == ["state-2.pt", "state-4.pt"]
    resumed = minisbert(*common, "--output", str(root / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    states = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    assert states == ["state-10.pt", "state-12.pt"]  # the newest 2 kept
    a, b = load_file(root / "full" / "model.safetensors"), load_file(root / "killed" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for log in ("train_loss.csv", "eval/similarity_evaluation_dev_results.csv"):
        assert (root / "full" / log).read_text() == (root / "killed" / log).read_text(), log


def test_resume_refuses_another_recipe_or_model(setup, tmp_path):
    root, model, raw = setup
    out = tmp_path / "out"
    first = minisbert("train", "--model", str(model), "--recipe", str(root / "recipe.json"), "--output", str(out),
                      kill=True)
    assert first.returncode == -9
    other = dict(raw, fit=dict(raw["fit"], optimizer_params={"lr": 2e-3}))
    (tmp_path / "other.json").write_text(json.dumps(other), encoding="utf-8")
    refused = minisbert("train", "--model", str(model), "--recipe", str(tmp_path / "other.json"), "--output",
                        str(out), "--resume")
    assert refused.returncode != 0 and "another recipe" in refused.stderr, refused.stderr
    another = make_checkpoint(tmp_path / "other-model", "bert", config=NO_DROPOUT, seed=1)
    refused = minisbert("train", "--model", str(another), "--recipe", str(root / "recipe.json"), "--output",
                        str(out), "--resume")
    assert refused.returncode != 0 and "was trained from" in refused.stderr, refused.stderr
