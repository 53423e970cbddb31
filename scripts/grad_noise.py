"""How far apart float32 gradients may honestly be: minisbert's first-step gradients against
sentence-transformers' loss classes, and both against the same loss in float64, over many batches.

The bounds of ``tests/test_train.py::test_first_step_loss_and_gradients`` come from this: per gradient
tensor, the relative distance minisbert - old_fit, old_fit - float64 and minisbert - float64, on the
tiny no-dropout checkpoints and the texts of the test (KorSTS's when the shared data is present),
``--batches`` batches of 8 for each loss and architecture, single-threaded.

    python scripts/grad_noise.py --batches 8
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import test_train as T  # noqa: E402  (the test's checkpoints, recipes and sentence-transformers side)
import torch  # noqa: E402
from conftest import make_checkpoint, single_thread  # noqa: E402

from minisbert import SentenceEncoder  # noqa: E402
from minisbert.fast.cpu import cpu_kind  # noqa: E402
from minisbert.train import loop  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="batches of 8 per loss and architecture (<= 8)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp())
    files = T.write_files(root)
    rows = []  # (case, tensor, minisbert - old_fit, old_fit - float64, minisbert - float64)
    for arch in T.ARCHS:
        path = make_checkpoint(root / arch, arch, config=T.NO_DROPOUT)
        for name, objective in (("mnr", T.MNR), ("cosine", T.COSINE)):
            task = loop.build_tasks(T.recipe(files, [objective]), random.Random(0))[0]
            for b in range(args.batches):
                batch = list(range(8 * b, 8 * b + 8))
                with single_thread():
                    ours = SentenceEncoder.from_pretrained(path)
                    with ours.mode(train=True):
                        loop.batch_loss(ours, task, batch).backward()
                    _, st = T.st_gradients(path, objective, task, batch)
                    _, truth = T.st_gradients(path, objective, task, batch, torch.float64)
                names = T.hf_names(path, ours)
                for n, p in ours.model.named_parameters():
                    if n.endswith("attn.key.bias") and arch != "deberta-v2":
                        continue  # zero in exact arithmetic: compared against the query bias in the test
                    s, t = st[names[n]], truth[names[n]]
                    rows.append((f"{arch} {name} batch {b}", n, T.relative(p.grad, s), T.relative(s, t),
                                 T.relative(p.grad, t)))
    diff, st_err, ours_err = np.array([r[2:] for r in rows]).T
    print(f"CPU: {cpu_kind().describe()}; {len(rows)} gradient tensors")
    over = diff > 1e-5
    print(f"minisbert - old_fit > 1e-5: {over.sum()} tensors; among them (minisbert - old_fit) / (old_fit - "
          f"float64) <= {(diff[over] / st_err[over]).max():.2f}" if over.any() else "none over 1e-5")
    big = st_err > 1e-6
    print(f"(minisbert - float64) / (old_fit - float64) where old_fit's error > 1e-6: max "
          f"{(ours_err[big] / st_err[big]).max():.2f}, median {np.median(ours_err[big] / st_err[big]):.2f}")
    print("worst five against the test's bound max(1e-5, 3 x old_fit's error):")
    for r in sorted(rows, key=lambda r: -r[2] / max(1e-5, 3 * r[3]))[:5]:
        print(f"  {r[0]} {r[1]}: {r[2]:.2e} apart, old_fit {r[3]:.2e} and minisbert {r[4]:.2e} off float64")


if __name__ == "__main__":
    main()
