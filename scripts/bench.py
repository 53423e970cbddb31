"""Throughput of minisbert against sentence-transformers (PyTorch and ONNX Runtime), in one process.

Every system embeds the same texts with the same batch size and threads; the systems take turns on
each chunk of texts (A B C A B C ...) so a machine shared with other work slows them alike, and the
median over repetitions of each system's total time is reported, and the ratio to sentence-transformers
within each repetition (pass). Also prints the agreement with
sentence-transformers and the achieved GFLOP/s against a big-matmul peak measured on the same machine.

    python scripts/bench.py --model random-bert --n 512 --repeats 5
    python scripts/bench.py --model jhgan/ko-sroberta-multitask --dtype bfloat16 --json out.json

``--model``: a folder, a hub id / short name, or ``random-bert`` / ``random-roberta`` /
``random-deberta`` (base-size seed configs built with transformers in a temp dir, with a Korean
WordPiece tokenizer trained on KorSTS). The ONNX system is sentence-transformers' ``backend="onnx"``
when optimum's ONNX Runtime integration imports; otherwise the same graph is exported with
``torch.onnx.export`` and run by onnxruntime behind sentence-transformers' own tokenization and
pooling (labelled ``ort-export``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The benchmark tokenizes on the main thread like the encoders do; rayon threads would fight torch's.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
RANDOM = {"random-bert": "bert", "random-roberta": "roberta", "random-deberta": "deberta-v2"}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def build_random(name: str, max_seq_length: int, tiny: bool = False) -> Path:
    """A random base-size (or tiny) checkpoint in sentence-transformers layout, cached in the temp dir."""
    from conftest import make_checkpoint

    arch = RANDOM[name]
    size = "tiny" if tiny else "base"
    folder = Path(tempfile.gettempdir()) / "minisbert-bench" / f"{name}-{size}-{max_seq_length}"
    if not (folder / "modules.json").is_file():
        config = dict(TINY if tiny else BASE)
        vocab = 3000 if tiny else (130000 if arch == "deberta-v2" else 32000)
        with contextlib.redirect_stderr(io.StringIO()):
            make_checkpoint(folder, arch, max_seq_length=max_seq_length, config=config, vocab_size=vocab)
    return folder


def workload(n: int, seed: int = 0) -> list[str]:
    """KorSTS test sentences plus passages of 5-15 of them joined (about one passage in five)."""
    from conftest import OWN_KOREAN, korsts_sentences

    rng = random.Random(seed)
    base = korsts_sentences("test") or OWN_KOREAN
    texts = []
    for _ in range(n):
        if rng.random() < 0.2:
            texts.append(" ".join(rng.choice(base) for _ in range(rng.randint(5, 15))))
        else:
            texts.append(rng.choice(base))
    return texts


# ---------------------------------------------------------------------------------------------------
# Systems: each is a name and a function texts -> (N, D) float32 numpy


def st_torch(path: Path, device: str, dtype: torch.dtype, max_seq_length: int):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=device).to(dtype)
    model.max_seq_length = max_seq_length
    return model


def st_onnx(path: Path, threads: int, max_seq_length: int):
    """(name, model) for sentence-transformers' ONNX backend, or our export when optimum is missing."""
    from sentence_transformers import SentenceTransformer

    try:
        import optimum.onnxruntime  # noqa: F401

        with tempfile.TemporaryDirectory() as tmp:
            # ST exports into the model folder; work on a copy so the source stays untouched.
            import shutil

            shutil.copytree(path, Path(tmp) / "m")
            model = SentenceTransformer(str(Path(tmp) / "m"), device="cpu", backend="onnx",
                                        model_kwargs={"provider": "CPUExecutionProvider"})
        model.max_seq_length = max_seq_length
        return "st-onnx", model
    except ImportError:
        pass
    return "ort-export", OrtExport(path, threads, max_seq_length)


class OrtExport:
    """sentence-transformers' tokenization and pooling around an onnxruntime session of the same model.

    What ST's ONNX backend does, minus optimum: the Hugging Face model exported by ``torch.onnx.export``
    (opset 17, dynamic batch and sequence axes) and run with ORT's default (all) graph optimisations.
    """

    def __init__(self, path: Path, threads: int, max_seq_length: int):
        import onnxruntime as ort
        import transformers
        from sentence_transformers import SentenceTransformer

        self.st = SentenceTransformer(str(path), device="cpu")
        self.st.max_seq_length = max_seq_length
        hf = transformers.AutoModel.from_pretrained(str(path)).eval()

        class Wrapped(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        ids = torch.ones(2, 16, dtype=torch.long)
        buf = io.BytesIO()
        axes = {0: "batch", 1: "tokens"}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(Wrapped(hf), (ids, torch.ones_like(ids)), buf,
                              input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                              opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")  # ST's longest-first batching
        dim = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        out = np.empty((len(texts), dim()), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            index = order[start: start + batch_size]
            features = self.st.tokenize([texts[i] for i in index])
            mask = features["attention_mask"].numpy()
            states = self.session.run(None, {"input_ids": features["input_ids"].numpy(),
                                             "attention_mask": mask})[0]  # (B, T, C)
            features = {"token_embeddings": torch.from_numpy(states), "attention_mask": torch.from_numpy(mask)}
            for module in list(self.st)[1:]:  # pooling, and Normalize where the model has it
                features = module(features)
            out[index] = features["sentence_embedding"].numpy()
        return out


# ---------------------------------------------------------------------------------------------------
# FLOPs and peak


def flops(lengths: list[int], cfg) -> float:
    """FLOPs of the real tokens: linears 2 * params * tokens, attention 4 * T^2 * C per sequence and layer.

    DeBERTa's relative terms are left out, so its figure is a lower bound.
    """
    C, F_, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    params = 4 * C * C + 2 * C * F_
    return float(sum(L * (2 * params * t + 4 * t * t * C) for t in lengths))


def peak_size(device: str) -> int:
    """The side of the square GEMM ``matmul_peak`` times: 8192 on a GPU (enough to fill a big one), else 2048."""
    return 8192 if device != "cpu" else 2048


def matmul_peak(dtype: torch.dtype, device: str = "cpu", repeats: int = 5) -> float:
    """Best GFLOP/s of a square GEMM of side ``peak_size(device)`` on ``device`` (on the CPU: F.linear
    (MKL) or oneDNN, whichever is faster)."""
    from minisbert.fast import mkldnn_usable

    size = peak_size(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    runs = [lambda: torch.nn.functional.linear(a, b)]
    if device == "cpu" and mkldnn_usable(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b)
        runs.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    with torch.inference_mode():
        for run in runs:
            run()
            sync()
            for _ in range(repeats):
                t = time.perf_counter()
                run()
                sync()
                best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-bert", help="folder, hub id, or random-bert/-roberta/-deberta")
    p.add_argument("--tiny", action="store_true", help="with random-*: a tiny model (for smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--n", type=int, default=256, help="number of texts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0,
                   help="texts per interleaving step (default 0: the whole set; smaller interleaves finer but "
                        "shrinks the set sentence-transformers sorts by length, so it pads more)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime system")
    p.add_argument("--no-reference", action="store_true", help="skip minisbert's reference (fast=False) path")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)

    from minisbert import SentenceEncoder

    path = build_random(args.model, args.max_seq_length, args.tiny) if args.model in RANDOM else args.model
    texts = workload(args.n)

    ours = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, fast=True)
    ours.max_seq_length = min(args.max_seq_length, ours.max_seq_length)
    lengths = [len(ids) for ids in ours.tokenizer.encode_ids(texts)]
    systems = {f"minisbert[{ours._packed.forward.backend}]": ours}
    if not args.no_reference:
        ref = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, fast=False)
        ref.max_seq_length = ours.max_seq_length
        systems["minisbert-reference"] = ref
    st_folder = ours.source if args.model not in RANDOM else path
    systems["st"] = st_torch(st_folder, args.device, dtype, ours.max_seq_length)
    if not args.no_onnx and args.device == "cpu":
        name, model = st_onnx(Path(st_folder), threads, ours.max_seq_length)
        systems[name] = model

    times = {name: [] for name in systems}
    for model in systems.values():  # warm-up
        model.encode(texts[: args.batch_size * 2], batch_size=args.batch_size)
    outputs = {name: [] for name in systems}  # the first repetition's embeddings, compared below
    # Interleaved per chunk of texts, not per pass, so a burst of other work on a shared machine hits
    # every system alike; a system's time for one pass is the sum over chunks, reported as the median
    # over repeats.
    chunk = args.chunk or len(texts)
    for _ in range(args.repeats):
        spent = dict.fromkeys(systems, 0.0)
        for start in range(0, len(texts), chunk):
            for name, model in systems.items():
                t = time.perf_counter()
                emb = model.encode(texts[start: start + chunk], batch_size=args.batch_size)
                spent[name] += time.perf_counter() - t
                if len(times[name]) == 0:
                    outputs[name].append(np.asarray(emb, dtype=np.float32))
        for name in systems:
            times[name].append(spent[name])
    outputs = {name: np.concatenate(parts) for name, parts in outputs.items()}

    fp32_st = outputs["st"]
    if dtype != torch.float32:
        # Agreement is judged against the fp32 sentence-transformers embedding of every text.
        fp32_st = np.asarray(st_torch(st_folder, args.device, torch.float32, ours.max_seq_length).encode(
            texts, batch_size=args.batch_size), dtype=np.float32)
    total_flops = flops(lengths, ours.model.config)
    peaks = {} if args.no_peak else {"fp32": matmul_peak(torch.float32, args.device)}
    if not args.no_peak and dtype != torch.float32:
        peaks[args.dtype] = matmul_peak(dtype, args.device)
    rows = []
    for name in systems:
        t = statistics.median(times[name])
        a, b = outputs[name], fp32_st
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        rows.append({"system": name, "seconds": t, "all_seconds": times[name], "sentences_per_s": len(texts) / t,
                     "tokens_per_s": sum(lengths) / t, "gflops": total_flops / t / 1e9,
                     "max_abs_diff_vs_st": float(np.abs(a - b).max()), "min_cosine_vs_st": float(cos.min())})
    by_name = {r["system"]: r for r in rows}
    onnx_name = next((n for n in ("st-onnx", "ort-export") if n in by_name), None)
    for r in rows:
        r["vs_st"] = by_name["st"]["seconds"] / r["seconds"]
        r["vs_onnx"] = by_name[onnx_name]["seconds"] / r["seconds"] if onnx_name else None
        # The same ratio within each pass (the systems' turns of one pass are minutes apart at most),
        # so a machine that speeds up or slows down between passes moves both sides of it.
        r["vs_st_per_pass"] = [st / ours for st, ours in zip(times["st"], times[r["system"]])]
    result = {"model": str(args.model), "device": args.device, "dtype": args.dtype, "threads": threads,
              "batch_size": args.batch_size, "max_seq_length": ours.max_seq_length, "n": len(texts),
              "tokens": sum(lengths), "repeats": args.repeats, "chunk": args.chunk, "peak_gflops": peaks,
              "onnx_system": onnx_name,
              "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows}
    if peaks:
        # The fastest any system could run these real tokens' FLOPs on this machine: what is left to win.
        seconds = total_flops / (peaks[args.dtype if dtype != torch.float32 else "fp32"] * 1e9)
        result["flop_bound"] = {"seconds": seconds, "sentences_per_s": len(texts) / seconds,
                                "vs_st": by_name["st"]["seconds"] / seconds,
                                "vs_onnx": by_name[onnx_name]["seconds"] / seconds if onnx_name else None}

    print(f"{args.model}  {args.dtype} on {args.device}, {threads} threads, batch {args.batch_size}, "
          f"max_seq_length {ours.max_seq_length}, {len(texts)} texts / {sum(lengths)} tokens, "
          f"median of {args.repeats} (interleaved every {args.chunk or len(texts)} texts), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{'system':<22}{'sent/s':>9}{'tok/s':>10}{'vs ST':>8}{'vs ONNX':>9}{'GFLOP/s':>9}"
          f"{'max|diff|':>11}{'min cos':>10}")
    for r in rows:
        vs_onnx = f"{r['vs_onnx']:.2f}" if r["vs_onnx"] else "-"
        print(f"{r['system']:<22}{r['sentences_per_s']:>9.1f}{r['tokens_per_s']:>10.0f}{r['vs_st']:>8.2f}"
              f"{vs_onnx:>9}{r['gflops']:>9.1f}{r['max_abs_diff_vs_st']:>11.2e}{r['min_cosine_vs_st']:>10.6f}")
    if args.repeats > 1:
        print("vs ST within each pass: " + "; ".join(
            f"{r['system']} " + " ".join(f"{x:.2f}" for x in r["vs_st_per_pass"]) for r in rows if r["system"] != "st"))
    if peaks:
        print(f"matmul peak ({peak_size(args.device)}^3 GEMM): "
              + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
        bound = result["flop_bound"]
        print(f"FLOP bound (every FLOP of the real tokens at the {args.dtype} peak, nothing else): "
              f"{bound['sentences_per_s']:.1f} sent/s = {bound['vs_st']:.2f}x st"
              + (f" = {bound['vs_onnx']:.2f}x {onnx_name}" if bound["vs_onnx"] else ""))
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return result


if __name__ == "__main__":
    main()
