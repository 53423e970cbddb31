"""The minisbert command (also ``python -m minisbert``): encode, embed-corpus, download, convert, eval-sts,
inspect, train, mine-hard-negatives, quantize, serve.

Every argument is checked before a model loads (loading takes seconds), and every error is one line
on stderr with exit status 2: the message names the file, flag or key at fault.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from minisbert import __version__, corpus, inspect, sts, train
from minisbert.checks import DTYPES, QUANTIZE, check_device, check_quantize, command_line_int, parse_dtype
from minisbert.corpus import job as corpus_job
from minisbert.corpus import ray_engine
from minisbert.encoder import SentenceEncoder
from minisbert.errors import MinisbertError
from minisbert.fast import int8
from minisbert.io import hub
from minisbert.io.files import write_atomically
from minisbert.io.weights import convert_to_safetensors
from minisbert.quantize import PRECISIONS
from minisbert.text.tokenizer import clean_text

DESCRIPTION = ("Sentence embeddings from BERT, RoBERTa, DeBERTa-v2, XLM-RoBERTa and ModernBERT "
               "sentence-transformers models, equal to sentence-transformers'. Run 'minisbert SUBCOMMAND -h' for "
               "a subcommand's flags.")
# --output suffix (any case) -> what is written
OUTPUT_FORMATS = {".npy": "npy", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, once: not for flags without one, nor where the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


positive_int = command_line_int()
token_count = command_line_int(2, " ([CLS] and [SEP] count)")


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="embed texts (arguments, --input file, or stdin, one per line)",
                       formatter_class=HelpFormatter)
    p.add_argument("texts", nargs="*", help="texts to embed (default: read lines from --input or stdin)")
    p.add_argument("--model", required=True,
                   help="model folder, short name from weights/models.json (e.g. all-MiniLM-L6-v2), or hub id")
    p.add_argument("--input", help="UTF-8 file with one text per line")
    p.add_argument("--decode-errors", choices=("strict", "replace"), default="strict",
                   help="input bytes that are not UTF-8: strict fails naming the file and line, replace reads "
                        "each as U+FFFD")
    p.add_argument("--output", help="write .npy or .jsonl here, atomically (default: JSON lines on stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per batch")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--max-seq-length", type=token_count, help="tokens per text (default: the model's own)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights' dtype")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="run the linear layers in int8 on the CPU: faster, inexact (cosine to float32 >= 0.99; "
                        "docs/performance.md)")
    p.add_argument("--int8-ranges", metavar="FILE",
                   help="with --quantize int8: static int8 from the input ranges 'minisbert quantize --calibrate' "
                        "wrote (faster; where a range was not kept, that layer stays dynamic)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--prompt-name", help="prepend this prompt of the model's config_sentence_transformers.json")
    p.add_argument("--prompt", help="prepend this text to every text (instead of the model's default prompt)")
    p.add_argument("--truncate-dim", type=positive_int, help="keep the first N dimensions (Matryoshka models)")


def read_lines(path: str | None, errors: str = "strict") -> list[str]:
    """The lines of ``path`` (stdin when None) without their line ends; bytes that are not UTF-8 are an
    error naming the file and line (``errors="replace"``: U+FFFD each)."""
    name = path or "<stdin>"
    if path is None:
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"--input {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{name}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); convert it first, "
                         f"e.g. iconv -f cp949 -t utf-8 FILE > FILE.utf8, or pass --decode-errors replace") from None
    # Lines as a text-mode file gives them (universal newlines), line ends dropped.
    return [line.rstrip("\r\n") for line in io.StringIO(text, newline=None)]


def check_arguments(texts: list[str], errors: str = "strict") -> list[str]:
    """Text arguments as given; bytes that were not UTF-8 (Python keeps them as surrogates) are an error
    naming the argument, or U+FFFD each with ``errors="replace"``: never written into the JSON."""
    for i, text in enumerate(texts):
        if clean_text(text) is not text:
            if errors == "strict":
                raise ValueError(f"text argument {i + 1} is not UTF-8 text; pass --decode-errors replace to read "
                                 f"its undecodable bytes as U+FFFD")
            texts = texts[:i] + [clean_text(text)] + texts[i + 1:]
    return texts


def output_format(path: str) -> str:
    """``npy`` or ``jsonl`` from the suffix of ``--output`` (any case); an unknown suffix is an error."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"--output {path}: unknown format {suffix or '(no suffix)'!r}; name the file .npy for a "
                         f"NumPy array, or .jsonl for JSON lines")
    return OUTPUT_FORMATS[suffix]


def check_output(path: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    output_format(path)
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"--output {path}: is a folder")
    if not folder.is_dir():
        raise ValueError(f"--output {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {path}: the folder {folder} is not writable")


def run_encode(args) -> int:
    # Everything that can be wrong with the arguments fails here, before seconds of loading.
    device, dtype = check_device(args.device), parse_dtype(args.dtype)
    check_quantize(args.quantize, device, dtype)
    if args.int8_ranges and args.quantize != "int8":
        raise ValueError("--int8-ranges needs --quantize int8")
    ranges = int8.load_ranges(args.int8_ranges) if args.int8_ranges else None
    if args.output:
        check_output(args.output)
    errors = args.decode_errors
    texts = check_arguments(args.texts, errors) if args.texts else read_lines(args.input, errors)
    encoder = SentenceEncoder.from_pretrained(args.model, device=device, dtype=dtype, revision=args.revision,
                                              quantize=args.quantize)
    if args.max_seq_length:
        encoder.max_seq_length = args.max_seq_length
    if ranges is not None:
        encoder.runner.forward.use_ranges(ranges)
    warn_unknown_tokens(encoder, texts)
    emb = encoder.encode(texts, batch_size=args.batch_size, normalize_embeddings=args.normalize,
                         prompt_name=args.prompt_name, prompt=args.prompt, truncate_dim=args.truncate_dim)
    if not texts:  # no input lines: a (0, D) array, as any other count of texts gives (N, D)
        emb = np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    lines = (json.dumps({"text": t, "embedding": [float(v) for v in e]}, ensure_ascii=False) + "\n"
             for t, e in zip(texts, emb))
    if args.output and output_format(args.output) == "npy":
        write_atomically(args.output, lambda f: np.save(f, emb))
        if encoder.dtype == torch.bfloat16:
            print("note: numpy has no bfloat16, so the .npy holds float32 (each bfloat16 value exactly)",
                  file=sys.stderr)
    elif args.output:
        write_atomically(args.output, lambda f: f.writelines(line.encode("utf-8") for line in lines))
    else:
        sys.stdout.writelines(lines)
    if args.output:
        n = emb.shape[0]
        print(f"wrote {n} embedding{'' if n == 1 else 's'} of dimension {emb.shape[1]} to {args.output}",
              file=sys.stderr)
    return 0


def warn_unknown_tokens(encoder: SentenceEncoder, texts: list[str], sample: int = 64) -> None:
    """Say so when most of the (first ``sample``) texts' word tokens are unknown to the model's vocabulary:
    an English model given Korean text, say, embeds little more than [UNK]."""
    unk = getattr(encoder.tokenizer, "unk_id", None)
    ids = encoder.tokenizer.encode_ids(texts[:sample]) if unk is not None else []
    words = [i for row in ids for i in row if i == unk or i not in encoder.tokenizer.special_ids]
    if words and words.count(unk) > len(words) / 2:
        print(f"warning: {words.count(unk)} of the {len(words)} word tokens of the first texts are unknown to "
              f"this model's vocabulary ([UNK]): it was not trained on this language, and its embeddings will "
              f"carry little meaning", file=sys.stderr)


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="fetch a short-name model (or hub id) into the local store",
                       formatter_class=HelpFormatter)
    p.add_argument("name", help="short name from weights/models.json, or a hub id")
    p.add_argument("--revision", help="hub revision (branch, tag or commit); default: the manifest's, else main")


def run_download(args) -> int:
    packaged = hub.installed_package_folder(args.name) if args.revision is None else None
    if packaged is not None:  # nothing to download: a Python package ships this model
        print(f"{args.name} comes with the installed Python package {packaged[0]}: nothing to download; use it by "
              f"its short name", file=sys.stderr)
        print(packaged[1])
        return 0
    print(hub.download(args.name, revision=args.revision))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write model.safetensors beside a legacy pytorch_model.bin (safe loader)",
                       formatter_class=HelpFormatter)
    p.add_argument("source", help="pytorch_model.bin, its shard index, or the folder holding it")
    p.add_argument("--output", help="target file (default: model.safetensors beside the source)")


def run_convert(args) -> int:
    source = Path(args.source)
    if source.is_dir():
        candidates = [source / n for n in ("pytorch_model.bin.index.json", "pytorch_model.bin")]
        source = next((c for c in candidates if c.is_file()), candidates[-1])
    target = Path(args.output) if args.output else source.parent / "model.safetensors"
    print(convert_to_safetensors(source, target))
    return 0


def _add_embed_corpus(sub) -> None:
    p = sub.add_parser("embed-corpus", help="embed files of texts into Parquet parts: streaming, resumable, "
                       "local processes or a Ray cluster (docs/corpus.md)",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="model folder, short name from weights/models.json, or hub id")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="input files: .jsonl/.ndjson, .parquet, .csv, .tsv (no quoting), .txt (one text a line)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the part files and _manifest.json")
    p.add_argument("--text-column", default="text", help="column (JSON field) of the texts; unused for .txt")
    p.add_argument("--id-column", help="column (JSON field) of the ids (default: the row's position in the inputs)")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="run here, or on Ray Data")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="local: worker processes (cores / N threads each); ray: actors; each with one encoder")
    p.add_argument("--threads", type=positive_int,
                   help="ray: CPUs (torch threads) per actor (default: the cluster's CPUs / workers)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="texts per batch (a token budget of batch size x max_seq_length, as encode)")
    p.add_argument("--max-seq-length", type=token_count, help="tokens per text (default: the model's own)")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="embedding type; int8/uint8 ranges come from the first 1024 rows and go in the manifest")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--resume", action="store_true",
                   help="finish a folder an interrupted run left: only missing parts are embedded")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="leave out rows that are not strings or not UTF-8 (listed in the manifest) instead of "
                        "stopping at the first")
    p.add_argument("--rows-per-part", type=positive_int, default=4096, help="rows per output file")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda (ray: one GPU per actor)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights' dtype")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def run_embed_corpus(args) -> int:
    # Arguments, optional packages, inputs and folder are checked before the model loads (embed_corpus).
    device = check_device(args.device) if args.engine == "local" else args.device
    corpus_job.pyarrow()
    if args.engine == "ray":
        ray_engine.ray_module()
    settings = corpus.CorpusSettings(args.model, revision=args.revision, dtype=args.dtype,
                               max_seq_length=args.max_seq_length, precision=args.precision,
                               normalize=args.normalize, text_column=args.text_column, id_column=args.id_column,
                               rows_per_part=args.rows_per_part, skip_bad_rows=args.skip_bad_rows)
    common = dict(resume=args.resume, batch_size=args.batch_size, workers=args.workers, device=str(device),
                  show_progress=False if args.no_progress else None)
    if args.engine == "local":
        done = corpus.embed_corpus(args.input, args.output, settings, **common)
    else:
        done = ray_engine.embed_corpus(args.input, args.output, settings, threads=args.threads,
                                     address=args.ray_address, **common)
    skipped = f", {len(done['bad_rows'])} bad rows skipped (listed in the manifest)" if done["bad_rows"] else ""
    n, parts, now = done["rows_written"], len(done["parts"]), done["parts_embedded"]
    redone = f" ({now} embedded by this run, {parts - now} already there)" if now < parts else ""
    print(f"wrote {n} embedding{'' if n == 1 else 's'} of dimension {done['dimension']} in {parts} "
          f"part{'' if parts == 1 else 's'}{redone} to {args.output}{skipped}", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    from minisbert.serve import command  # imported here: only ``serve`` needs the room (and its extra, to run)

    command.add_arguments(sub.add_parser(
        "serve", help="an OpenAI- and text-embeddings-inference-compatible embeddings server (docs/serving.md)",
        formatter_class=HelpFormatter))


def run_serve(args) -> int:
    from minisbert.serve import command

    return command.run(args)



def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="calibrate static int8: each linear layer's input range on your texts, "
                       "written to a file for 'encode --quantize int8 --int8-ranges'", formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="model folder, short name or hub id")
    p.add_argument("--calibrate", required=True, metavar="FILE",
                   help="UTF-8 file with one text per line, like the texts you will embed (a few hundred)")
    p.add_argument("--output", required=True, metavar="FILE", help="the ranges file to write (JSON)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per batch")
    p.add_argument("--max-seq-length", type=token_count, help="tokens per text (default: the model's own)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")


def run_quantize(args) -> int:
    texts = [t for t in read_lines(args.calibrate) if t.strip()]
    if not texts:
        raise ValueError(f"--calibrate {args.calibrate}: no texts")
    encoder = SentenceEncoder.from_pretrained(args.model, revision=args.revision, fast=True)
    if not encoder.fast:
        raise ValueError(f"{args.model}: this model has no fast path, which int8 runs on")
    if args.max_seq_length:
        encoder.max_seq_length = args.max_seq_length
    with encoder.runner.forward.observe() as ranges:  # on the exact fp32 forward
        encoder.encode(texts, batch_size=args.batch_size)
    write_atomically(args.output, lambda f: f.write(int8.dumps_ranges(ranges).encode("utf-8")))
    static = sum(len(r) for r in ranges)
    print(f"wrote {args.output}: {static} of {4 * len(ranges)} linear layers static ({len(texts)} texts)",
          file=sys.stderr)
    return 0


# name -> (add the subcommand's parser, run it); eval-sts, inspect, train and serve live in their own modules.
COMMANDS = {
    "encode": (_add_encode, run_encode),
    "embed-corpus": (_add_embed_corpus, run_embed_corpus),
    "download": (_add_download, run_download),
    "convert": (_add_convert, run_convert),
    "quantize": (_add_quantize, run_quantize),
    "eval-sts": (lambda sub: sts.add_arguments(sub.add_parser(
        "eval-sts", help="score STS pairs (KorSTS, KLUE-STS, CSV/TSV/JSONL) like the model cards",
        formatter_class=HelpFormatter)), sts.run),
    "inspect": (lambda sub: inspect.add_arguments(sub.add_parser(
        "inspect", help="what is inside a checkpoint: config, parameters, key mapping",
        formatter_class=HelpFormatter)), inspect.run),
    "train": (lambda sub: train.add_arguments(sub.add_parser(
        "train", help="fine-tune with a recipe (sentence-transformers' fit: MultipleNegativesRankingLoss, "
        "CosineSimilarityLoss, several objectives)",
        formatter_class=HelpFormatter)), train.run),
    "mine-hard-negatives": (lambda sub: train.add_mine_arguments(sub.add_parser(
        "mine-hard-negatives", help="hard negatives for (anchor, positive) pairs, mined with the model "
        "(sentence-transformers' mine_hard_negatives)", formatter_class=HelpFormatter)), train.run_mine),
    "serve": (_add_serve, run_serve),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minisbert", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"minisbert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (MinisbertError, OSError, ValueError) as e:
        print(f"minisbert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minisbert {args.command}: interrupted", file=sys.stderr)
        return 130
