"""CPU time and peak RSS growth of encoding one very long text, per shape (docs/guarantees.md).

    python scripts/long_texts.py                      # 5 MB texts, minisbert's cut and squeeze
    python scripts/long_texts.py --chars 300000 --whole   # also the whole text through the tokenizer

Each shape runs in this process one after the other; the peak RSS (VmHWM) is reset before each one
(Linux /proc/self/clear_refs). With --whole, the tokenizer's whole-text path runs right after minisbert's
on the same text (``cut_is_safe = False``: what a text costs without cutting).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

# The shapes tests/test_hostile.py holds to < 1 s and < 100 MB, from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_hostile import SHAPES  # noqa: E402


def status(key: str) -> int:
    """A /proc/self/status value in kB."""
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def measure(encode, text: str) -> tuple[float, float]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before, cpu = status("VmRSS"), time.process_time()
    encode(text)
    return time.process_time() - cpu, (status("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model folder or short name")
    parser.add_argument("--chars", type=int, default=5_000_000, help="characters per text")
    parser.add_argument("--whole", action="store_true", help="also tokenize each text whole, for comparison")
    args = parser.parse_args()

    import torch

    from minisbert import SentenceEncoder

    torch.set_num_threads(1)
    encoder = SentenceEncoder.from_pretrained(args.model)
    encoder.encode(["warm up"])
    tok = encoder.tokenizer
    print(f"{args.model}, max_seq_length {encoder.max_seq_length}, {args.chars:,} characters per text")
    whole = f" {'whole CPU s':>12s} {'whole MiB':>10s}" if args.whole else ""
    print(f"{'shape':24s} {'CPU s':>7s} {'peak MiB':>9s}{whole}")
    for name, shape in SHAPES.items():
        text = (shape * (args.chars // len(shape) + 1))[: args.chars]
        cpu, mib = measure(lambda t: encoder.encode([t]), text)
        row = f"{name:24s} {cpu:7.3f} {mib:+9.0f}"
        if args.whole:
            tok.cut_is_safe = False
            cpu, mib = measure(lambda t: encoder.encode([t]), text)
            tok.cut_is_safe = True
            row += f" {cpu:12.3f} {mib:+10.0f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
