"""Rate and peak memory at 512 / 2,048 / 8,192 tokens: minisbert beside sentence-transformers, for
base-size random ModernBERT (gte-modernbert-base's shape) and XLM-RoBERTa (8,194 positions, bge-m3's
kind at base size) checkpoints (docs/performance.md, "Long inputs").

    python scripts/long_inputs.py                          # both architectures, all three lengths
    python scripts/long_inputs.py --arch modernbert --lengths 8192 --repeats 1

Texts are cut at exactly the length (max_seq_length set to it on both sides): batches of 16 texts at 512
tokens, 4 at 2,048, 1 at 8,192; ``--mixed`` adds rows where the batch's texts are spread evenly up to the
length (1/16, 2/16, ... of it), as passages of real documents are.
Both systems run in this process, interleaved, best of ``--repeats``;
peak memory is the growth of the process's peak RSS during one encode (Linux ``/proc/self/clear_refs``),
so it counts what the forward allocates beyond the weights both hold. The vocabulary is the tests'
tiny byte-level BPE / SentencePiece one (embedding tables do not change the rate), the bodies are the
real models' sizes.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BATCH = {512: 16, 2048: 4, 8192: 1}
MODERNBERT_BASE = dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
                       max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128)
XLMR_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=8194)


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def measure(encode, texts) -> tuple[float, float]:
    """(seconds, peak RSS growth in MiB) of one ``encode(texts)``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before, start = status("VmRSS"), time.perf_counter()
    encode(texts)
    return time.perf_counter() - start, (status("VmHWM") - before) / 1024


def build(arch: str, root: Path) -> Path:
    from new_archs import make_modernbert_checkpoint, make_xlmr_checkpoint

    if arch == "modernbert":
        return make_modernbert_checkpoint(root / arch, max_seq_length=8192, config=MODERNBERT_BASE)
    return make_xlmr_checkpoint(root / arch, pooling="cls", max_seq_length=8192, config=XLMR_BASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["modernbert", "xlm-roberta", "both"], default="both")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mixed", action="store_true", help="also batches of texts of spread lengths")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from minisbert import SentenceEncoder
    from minisbert.fast.cpu import cpu_kind

    print(f"CPU: {cpu_kind().describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    archs = ["modernbert", "xlm-roberta"] if args.arch == "both" else [args.arch]
    lengths = [int(n) for n in args.lengths.split(",")]
    print("tokens: every text that long; ~: the batch's texts spread evenly up to it")
    print(f"{'model':12s} {'tokens':>6s} {'batch':>5s} | {'ST texts/s':>10s} {'ours texts/s':>12s} {'speed-up':>8s} | "
          f"{'ST peak MiB':>11s} {'ours peak MiB':>13s} | {'max abs diff':>12s}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            folder = build(arch, Path(tmp))
            st = SentenceTransformer(str(folder), device="cpu")
            ours = SentenceEncoder(str(folder))
            shapes = [(T, False) for T in lengths] + [(T, True) for T in lengths if args.mixed and BATCH[T] > 1]
            for T, mixed in shapes:
                st.max_seq_length = ours.max_seq_length = T
                n = BATCH[T]
                long = "한국어 문장과 English words, 숫자 1,234. " * (T // 4)
                texts = [f"{i}번째 긴 문서입니다. " + long for i in range(n)]
                if mixed:  # cut each to its share of T tokens through the tokenizer's own offsets
                    ids = ours.tokenizer.encode_ids(texts)
                    texts = [ours.tokenizer.tokenizer.decode(row[1: max(2, T * (i + 1) // n - 1)])
                             for i, row in enumerate(ids)]
                else:
                    assert all(len(r) == T for r in ours.tokenizer.encode_ids(texts))
                runs = {"st": [], "ours": []}
                outs = {}
                for _ in range(args.repeats):  # interleaved
                    for name, model in (("st", st), ("ours", ours)):
                        def fn(t, model=model):
                            return model.encode(t, batch_size=len(t))
                        outs[name] = fn(texts[:1])  # warm-up for this shape, and the output compared
                        runs[name].append(measure(fn, texts))
                best = {k: (min(s for s, _ in v), min(m for _, m in v)) for k, v in runs.items()}
                rate = {k: len(texts) / s for k, (s, _) in best.items()}
                diff = float(np.abs(outs["st"] - outs["ours"]).max())
                mark = "~" if mixed else " "
                print(f"{arch:12s} {T:6d}{mark}{len(texts):5d} | {rate['st']:10.2f} {rate['ours']:12.2f} "
                      f"{rate['ours'] / rate['st']:7.2f}x | {best['st'][1]:11.0f} {best['ours'][1]:13.0f} | "
                      f"{diff:12.2e}", flush=True)


if __name__ == "__main__":
    main()
