"""Data-parallel training's specification, on CPU with 2 gloo ranks started as real processes: with
dropout off and the same data order, 2 ranks of batch B with ``gather_across_devices`` take the steps of
one process with batch 2B (the losses per step, the trained embeddings), for MNR on pairs and on
triplets (the label alignment sentence-transformers' PR #3453 fixed), CachedMNR and GIST."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import corpus, make_checkpoint, single_thread
from test_train import NO_DROPOUT

from minisbert import train
from minisbert.encoder import SentenceEncoder

CASES = {
    "mnr-pairs": ("MultipleNegativesRankingLoss", {"gather_across_devices": True}, 2),
    "mnr-triplets": ("MultipleNegativesRankingLoss", {"gather_across_devices": True}, 3),
    "mnr-4-columns": ("MultipleNegativesRankingLoss", {"gather_across_devices": True}, 4),
    "cached-mnr": ("CachedMultipleNegativesRankingLoss", {"gather_across_devices": True, "mini_batch_size": 3}, 3),
    "gist": ("GISTEmbedLoss", {"gather_across_devices": True, "guide": "GUIDE", "temperature": 0.05}, 3),
}
PROBE = corpus(16, seed=11)


def write_data(root: Path, columns: int) -> Path:
    texts = [t.replace("\t", " ") for t in corpus(32 * columns, seed=8)]
    path = root / f"data{columns}.jsonl"
    names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, columns - 1)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(32):
            f.write(json.dumps(dict(zip(names, texts[columns * i: columns * i + columns])), ensure_ascii=False) + "\n")
    return path


def recipe(root: Path, model: Path, case: str, batch_size: int) -> train.Recipe:
    name, params, columns = CASES[case]
    params = {k: (str(model) if v == "GUIDE" else v) for k, v in params.items()}
    return train.parse_recipe({
        "objectives": [{"data": str(write_data(root, columns)), "format": "dataset", "loss": name,
                        "loss_params": params, "batch_size": batch_size, "sampler": "shuffle"}],
        "fit": {"epochs": 2, "warmup_steps": 2, "optimizer_params": {"lr": 1e-3}}, "seed": 3})


def run(model: Path, rec: train.Recipe) -> tuple[list[float], np.ndarray]:
    encoder = SentenceEncoder.from_pretrained(model)
    result = train.fit(encoder, rec, None, progress=False)
    return [r["loss"] for r in result.losses], encoder.encode(PROBE)


def rank_main(rank: int, root: str, model: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    try:
        out = {case: run(Path(model), recipe(Path(root), Path(model), case, 4)) for case in CASES}
        torch.save(out, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    model = make_checkpoint(root / "bert", "bert", config=NO_DROPOUT)
    mp.start_processes(rank_main, args=(str(root), str(model)), nprocs=2, join=True, start_method="spawn")
    return root, model, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_twice_the_batch(two_ranks, case):
    root, model, ranks = two_ranks
    with single_thread():
        losses, embeddings = run(model, recipe(root, model, case, 8))
    for rank in ranks:  # every rank logs the mean over ranks and ends with the same weights
        rank_losses, rank_embeddings = rank[case]
        assert len(rank_losses) == len(losses) == 8
        rel = np.abs(np.array(rank_losses) - losses) / np.abs(losses)
        diff = float(np.abs(rank_embeddings - embeddings).max())
        print(f"\n{case}: loss rel max {rel.max():.2e}, embeddings {diff:.2e}")
        assert rel.max() <= 1e-4, rel
        assert diff <= 5e-3, diff
    assert np.array_equal(ranks[0][case][1], ranks[1][case][1])


# ---------------------------------------------------------------------------------------------------
# The command under torchrun: 2 ranks against one process, and a killed 2-rank run resumed

KILL_AFTER_STEP_4 = """
import os, signal, sys
from minisbert.train import state
save = state.TrainingState.save
def killing_save(self, trained, step):
    save(self, trained, step)
    if step == 4 and self.rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
state.TrainingState.save = killing_save
from minisbert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def command(args: list[str], ranks: int = 1, script: Path | None = None):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    target = [str(script)] if script is not None else ["-m", "minisbert"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    else:
        launch = [sys.executable]
    return subprocess.run(launch + target + args, env=env, capture_output=True, text=True, timeout=300)


def write_recipe(root: Path, batch_size: int, name: str) -> Path:
    raw = {"objectives": [{"data": str(write_data(root, 3)), "format": "dataset", "sampler": "shuffle",
                           "loss": "MultipleNegativesRankingLoss", "loss_params": {"gather_across_devices": True},
                           "batch_size": batch_size}],
           "fit": {"epochs": 2, "warmup_steps": 2, "optimizer_params": {"lr": 1e-3}, "checkpoint_save_steps": 2},
           "seed": 3}
    path = root / name
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


@pytest.mark.slow
def test_torchrun_two_ranks_and_resume(tmp_path):
    """``torchrun --nproc_per_node 2 -m minisbert train``: rank 0 alone writes, the model equals one
    process's with batch 2B; killed after its second state (rank 0 SIGKILLed, torchrun stops the other)
    and resumed under torchrun, it ends with the unkilled 2-rank run's weights, bit for bit."""
    from safetensors.torch import load_file

    model = make_checkpoint(tmp_path / "bert", "bert", config=NO_DROPOUT)
    two, one = write_recipe(tmp_path, 4, "two.json"), write_recipe(tmp_path, 8, "one.json")
    base = ["train", "--model", str(model)]
    full = command(base + ["--recipe", str(two), "--output", str(tmp_path / "two")], ranks=2)
    assert full.returncode == 0, full.stderr[-3000:]
    single = command(base + ["--recipe", str(one), "--output", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (SentenceEncoder.from_pretrained(tmp_path / d).encode(PROBE) for d in ("two", "one"))
    assert float(np.abs(a - b).max()) <= 5e-3
    assert full.stderr.count("8 steps in ") == 1  # rank 0 alone reports

    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_STEP_4, encoding="utf-8")
    killed = command(base + ["--recipe", str(two), "--output", str(tmp_path / "killed")], ranks=2, script=script)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["state-2.pt", "state-4.pt"]
    resumed = command(base + ["--recipe", str(two), "--output", str(tmp_path / "killed"), "--resume"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    x, y = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    for name in x:
        assert torch.equal(x[name], y[name]), name
    assert (tmp_path / "two" / "train_loss.csv").read_text() == (tmp_path / "killed" / "train_loss.csv").read_text()
