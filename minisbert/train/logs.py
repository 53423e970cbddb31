"""What a training run reports as it goes: ``train_loss.csv`` (every objective's loss and learning rate
per step) and progress, a tqdm bar on a terminal or plain lines where stderr is a file or a pipe."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class LossLog:
    """``output/train_loss.csv``: epoch, step, objective, loss, lr; without an output folder, nothing.
    ``resumed_at`` > 0: a resumed run's log, its rows up to that step kept, later ones dropped."""

    def __init__(self, output: Path | None, resumed_at: int = 0):
        kept = []
        if output is not None and resumed_at and (output / "train_loss.csv").exists():
            with open(output / "train_loss.csv", newline="", encoding="utf-8") as f:
                kept = [r for r in list(csv.reader(f))[1:] if int(r[1]) <= resumed_at]
        self.file = open(output / "train_loss.csv", "w", newline="", encoding="utf-8") if output is not None else None
        self.writer = csv.writer(self.file) if self.file is not None else None
        if self.writer is not None:
            self.writer.writerow(["epoch", "step", "objective", "loss", "lr"])
            self.writer.writerows(kept)

    def write(self, record: dict) -> None:
        if self.writer is not None:
            self.writer.writerow(record.values())

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def __enter__(self) -> LossLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


class Progress:
    """``show``: a tqdm bar when stderr is a terminal; otherwise a line on stderr every ``every`` steps
    (by default a tenth of the run, or 100 steps if that is fewer) and after the last, e.g.
    ``step 18/180: loss 0.0612, lr 1.8e-05, 41 s`` (one loss per objective, separated by ``/``), so a
    log file shows how far a run is."""

    def __init__(self, total: int, show: bool = True, every: int | None = None):
        self.total, self.show, self.stream = total, show, sys.stderr
        self.every = every or max(1, min(100, total // 10))
        terminal = show and getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc="Training", unit="step", file=self.stream) if terminal else None
        self.start = time.perf_counter()

    def update(self, step: int, records: list[dict]) -> None:
        """After ``step`` (1-based); ``records``: its loss-log rows, one per objective."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{records[-1]['loss']:.4f}")
        elif self.show and (step % self.every == 0 or step == self.total):
            losses = "/".join(f"{r['loss']:.4f}" for r in records)
            print(f"step {step}/{self.total}: loss {losses}, lr {records[0]['lr']:.3g}, "
                  f"{time.perf_counter() - self.start:.0f} s", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
