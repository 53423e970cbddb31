"""How inexact minisbert's int8 mode is: each embedding's cosine to the fp32 one, and KorSTS scores.

For each model: the benchmark's workload (``scripts/bench.py``: KorSTS sentences and passages) embedded
in fp32 and with ``quantize="int8"``; the lowest and mean cosine between the two embeddings of each
text; then, where the shared data's ``korsts/sts-test.tsv`` (or ``--korsts``) exists, the KorSTS test
cosine Spearman x 100 of both (``minisbert.sts.evaluate_sts``, the model cards' figure). Static int8
(``int8-static``: input ranges calibrated on ``bench.calibration_texts``, KorSTS dev) is measured too.
With ``--onnx-int8`` (needs the ``st-onnx`` extra's environment) the same figures for
sentence-transformers' dynamic-int8 ONNX export, and with ``--openvino-int8`` (the ``st-openvino``
extra's) for its static-int8 OpenVINO export calibrated on the same texts, for comparison.

    python scripts/int8_accuracy.py --model all-MiniLM-L6-v2 --model random-bert
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench import RANDOM, build_random, calibration_texts, onnx_systems, st_openvino_int8, workload  # noqa: E402
from conftest import shared_data  # noqa: E402

from minisbert import SentenceEncoder  # noqa: E402
from minisbert.sts import evaluate_sts, read_sts  # noqa: E402


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="folder, short name, or random-bert/-roberta/-deberta "
                                                    "(repeatable; default all-MiniLM-L6-v2)")
    p.add_argument("--n", type=int, default=512, help="texts of the benchmark workload")
    p.add_argument("--max-seq-length", type=int, default=None, help="default: the model's own (random-*: 128)")
    p.add_argument("--texts", default="mixed", choices=["mixed", "passages"])
    p.add_argument("--korsts", default=str(shared_data("korsts/sts-test.tsv") or ""),
                   help="KorSTS test file (default: the shared data's, when present; '' to skip)")
    p.add_argument("--onnx-int8", action="store_true", help="also sentence-transformers' dynamic-int8 ONNX export")
    p.add_argument("--openvino-int8", action="store_true",
                   help="also sentence-transformers' static-int8 OpenVINO export (same calibration texts)")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    texts = workload(args.n, kind=args.texts)
    korsts = read_sts(args.korsts) if args.korsts and Path(args.korsts).is_file() else None
    if korsts is None:
        print(f"{args.korsts or 'the shared data'}: no KorSTS test file, KorSTS figures skipped")
    results = {}
    for name in args.model or ["all-MiniLM-L6-v2"]:
        path = build_random(name, args.max_seq_length or 128) if name in RANDOM else name
        systems = {"fp32": SentenceEncoder.from_pretrained(path), "int8": SentenceEncoder.from_pretrained(
            path, quantize="int8"), "int8-static": SentenceEncoder.from_pretrained(path, quantize="int8")}
        for encoder in systems.values():
            encoder.max_seq_length = min(args.max_seq_length or encoder.max_seq_length, encoder.max_seq_length)
        calibration = calibration_texts(kind=args.texts)
        with systems["fp32"].runner.forward.observe() as ranges:
            systems["fp32"].encode(calibration, batch_size=32)
        systems["int8-static"].runner.forward.use_ranges(ranges)
        if args.onnx_int8:
            with contextlib.redirect_stdout(io.StringIO()):
                onnx = onnx_systems(Path(systems["fp32"].source), 2, systems["fp32"].max_seq_length, [], True)
            systems["st-onnx-int8"] = onnx["st-onnx-int8"]
        if args.openvino_int8:
            folder, length = Path(systems["fp32"].source), systems["fp32"].max_seq_length
            systems["st-openvino-int8"] = st_openvino_int8(folder, 2, length, calibration)
        emb = {k: np.asarray(e.encode(texts, batch_size=32), dtype=np.float32) for k, e in systems.items()}
        row = {}
        for k in systems:
            if k == "fp32":
                continue
            cos = cosines(emb[k], emb["fp32"])
            row[k] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        if korsts is not None:
            for k, e in systems.items():
                scores = evaluate_sts(e, korsts.sentences1, korsts.sentences2, korsts.scores)
                row.setdefault(k, {})["korsts_cosine_spearman"] = 100 * scores["cosine_spearman"]
        results[name] = row
        print(f"{name}  ({len(texts)} {args.texts} texts, max_seq_length {systems['fp32'].max_seq_length})")
        fp32_s = row.get("fp32", {}).get("korsts_cosine_spearman")
        if fp32_s is not None:
            print(f"  fp32{'':<14} KorSTS test cosine Spearman {fp32_s:.2f}")
        for k, v in row.items():
            if k == "fp32":
                continue
            line = f"  {k:<18} cosine to fp32: min {v['min_cosine']:.5f} mean {v['mean_cosine']:.5f}"
            if "korsts_cosine_spearman" in v:
                line += f"; KorSTS {v['korsts_cosine_spearman']:.2f} ({v['korsts_cosine_spearman'] - fp32_s:+.2f})"
            print(line)
    return results


if __name__ == "__main__":
    main()
