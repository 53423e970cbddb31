"""``minisbert`` / ``python -m minisbert``: encode, download, convert, eval-sts, inspect."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np

# Subcommands implemented in their own modules: each has add_arguments(parser) and run(args) -> int.
EXTERNAL = {
    "eval-sts": ("minisbert.sts", "score STS pairs (KorSTS, KLUE-STS, CSV/TSV/JSONL) like the model cards"),
    "inspect": ("minisbert.inspect", "what is inside a checkpoint: config, parameters, key mapping"),
}


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="embed texts (arguments, --input file, or stdin, one per line)")
    p.add_argument("texts", nargs="*", help="texts to embed (default: read lines from --input or stdin)")
    p.add_argument("--model", required=True, help="model folder, manifest short name, or hub id")
    p.add_argument("--input", help="file with one text per line")
    p.add_argument("--output", help="write .npy or .jsonl here (default: JSON lines on stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--max-seq-length", type=int, help="override the model's max_seq_length")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--prompt-name", help="prepend this prompt of the model's config_sentence_transformers.json")
    p.add_argument("--prompt", help="prepend this text to every text (instead of the model's default prompt)")
    p.add_argument("--truncate-dim", type=int, help="keep the first N dimensions (Matryoshka models)")


def run_encode(args) -> int:
    import torch

    from minisbert import SentenceEncoder

    if args.texts:
        texts = args.texts
    else:
        stream = open(args.input, encoding="utf-8") if args.input else sys.stdin
        with stream:
            texts = [line.rstrip("\r\n") for line in stream]
    encoder = SentenceEncoder.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                              revision=args.revision)
    if args.max_seq_length:
        encoder.max_seq_length = args.max_seq_length
    emb = encoder.encode(texts, batch_size=args.batch_size, normalize_embeddings=args.normalize,
                         prompt_name=args.prompt_name, prompt=args.prompt, truncate_dim=args.truncate_dim)
    if args.output and args.output.endswith(".npy"):
        np.save(args.output, emb)
    else:
        lines = (json.dumps({"text": t, "embedding": [float(v) for v in e]}, ensure_ascii=False)
                 for t, e in zip(texts, emb))
        if args.output:
            Path(args.output).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        else:
            for line in lines:
                print(line)
    if args.output:
        print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {args.output}", file=sys.stderr)
    return 0


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch a manifest model (or hub id) into weights/NAME/")
    p.add_argument("name", help="short name from weights/models.json, or a hub id")
    p.add_argument("--revision")


def run_download(args) -> int:
    from minisbert import hub

    folder = hub.download(args.name, revision=args.revision)
    print(folder)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write model.safetensors beside a legacy pytorch_model.bin (safe loader)")
    p.add_argument("source", help="pytorch_model.bin, its shard index, or the folder holding it")
    p.add_argument("--output", help="target file (default: model.safetensors beside the source)")


def run_convert(args) -> int:
    from minisbert.checkpoint import convert_to_safetensors

    source = Path(args.source)
    if source.is_dir():
        candidates = [source / n for n in ("pytorch_model.bin.index.json", "pytorch_model.bin")]
        source = next((c for c in candidates if c.is_file()), candidates[-1])
    target = Path(args.output) if args.output else source.parent / "model.safetensors"
    print(convert_to_safetensors(source, target))
    return 0


BUILTIN = {"encode": (_add_encode, run_encode), "download": (_add_download, run_download),
           "convert": (_add_convert, run_convert)}


def main(argv: list[str] | None = None) -> int:
    from minisbert.errors import MinisbertError

    parser = argparse.ArgumentParser(prog="minisbert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (add, run) in BUILTIN.items():
        add(sub)
        runners[name] = run
    for name, (module_name, help_text) in EXTERNAL.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.add_arguments(sub.add_parser(name, help=help_text))
        runners[name] = module.run
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except (MinisbertError, OSError, ValueError) as e:
        print(f"minisbert {args.command}: error: {e}", file=sys.stderr)
        return 2
