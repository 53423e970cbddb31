"""Throughput of minisbert against sentence-transformers and the CPU peers users pick, in one process.

Every system embeds the same texts with the same batch size and threads; the systems take turns on
each chunk of texts (A B C A B C ...) so a machine shared with other work slows them alike, and the
median over repetitions of each system's total time is reported, with the spread over passes and the
ratio to sentence-transformers within each repetition (pass). Also prints the agreement with
sentence-transformers, the achieved GFLOP/s against a big-matmul peak measured on the same machine
(and the FLOP bound that peak sets), the GEMM bound (minisbert's own linears alone at this workload's
shapes, timed in the same turns: what the machine's GEMM library allows), the CPU's kind and the load
average before and after.

    python scripts/bench.py --model random-bert --n 512 --repeats 5
    python scripts/bench.py --model random-bert --quantize int8 --n 512 --repeats 5
    python scripts/bench.py --model random-roberta --max-seq-length 512 --texts passages --n 64
    python scripts/bench.py --model jhgan/ko-sroberta-multitask --dtype bfloat16 --json out.json

``--model``: a folder, a hub id / short name, or ``random-bert`` / ``random-roberta`` /
``random-deberta`` (base-size seed configs built with transformers in a temp dir, with a Korean
WordPiece tokenizer trained on KorSTS).

Peers, each when its packages import (the ``st-onnx`` extra's second environment has them all):
``st-onnx`` (sentence-transformers' ``backend="onnx"``; without optimum the same graph exported with
``torch.onnx.export`` and run by onnxruntime behind sentence-transformers' tokenization and pooling,
labelled ``ort-export``), ``st-onnx-O2``/``-O3`` (``export_optimized_onnx_model``; O3 approximates
GELU), ``st-onnx-int8`` (``export_dynamic_quantized_onnx_model`` for this CPU's instruction set:
avx512_vnni, avx512, avx2 or arm64), ``st-openvino`` (``backend="openvino"`` at the run's dtype:
OpenVINO's own default on a CPU with native bf16 is bf16, so fp32 is asked for explicitly),
``st-openvino-bf16`` (with ``--bf16``) and ``st-openvino-int8`` (``export_static_quantized_openvino_model``,
NNCF's static int8, calibrated on ``calibration_texts``: its default set is on the hub).
``--quantize int8`` adds minisbert's int8 modes beside its fp32: ``int8`` (dynamic, per-token scales) and
``int8-static`` (ranges calibrated on the same ``calibration_texts``); ``--bf16`` adds ``minisbert[bf16]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
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

from minisbert.fast.cpu import cpu_kind  # noqa: E402
from minisbert.fast.int8 import onednn_int8_usable  # noqa: E402

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


WORKLOADS = ("mixed", "passages")


def workload(n: int, seed: int = 0, kind: str = "mixed", split: str = "test") -> list[str]:
    """``mixed``: KorSTS test sentences plus passages of 5-15 of them joined (about one passage in five).
    ``passages``: every text a passage of 8-30 sentences (~150-600 tokens: many cut at 512).
    ``split``: the KorSTS split the sentences come from (``calibration_texts``: dev)."""
    from conftest import OWN_KOREAN, korsts_sentences

    rng = random.Random(seed)
    base = korsts_sentences(split) or OWN_KOREAN[::-1]
    texts = []
    for _ in range(n):
        if kind == "passages":
            texts.append(" ".join(rng.choice(base) for _ in range(rng.randint(8, 30))))
        elif rng.random() < 0.2:
            texts.append(" ".join(rng.choice(base) for _ in range(rng.randint(5, 15))))
        else:
            texts.append(rng.choice(base))
    return texts


CALIBRATION = 300  # texts: NNCF's default num_samples for OpenVINO static int8, also minisbert's


def calibration_texts(n: int = CALIBRATION, kind: str = "mixed") -> list[str]:
    """Static int8's calibration set: texts of the same kind as the workload from KorSTS dev sentences,
    none of which the test-split workload holds (without the shared data: the stand-in sentences, reversed
    order and another seed)."""
    return workload(n, seed=1, kind=kind, split="dev")


# ---------------------------------------------------------------------------------------------------
# Systems: each is a name and a function texts -> (N, D) float32 numpy


def st_torch(path: Path, device: str, dtype: torch.dtype, max_seq_length: int):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device=device).to(dtype)
    model.max_seq_length = max_seq_length
    return model


def onnx_int8_config() -> str:
    """sentence-transformers' name of the dynamic-int8 ONNX config for this CPU's instruction set."""
    flags = cpu_kind().flags or ()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags or cpu_kind().capability.startswith("AVX") else "arm64"


def onnx_systems(path: Path, threads: int, max_seq_length: int, optimized: list[str], int8: bool) -> dict:
    """{name: model}: sentence-transformers' ONNX backend, its optimised (O1-O3) and dynamic-int8 exports;
    or only our ``torch.onnx.export`` (``ort-export``) when optimum's ONNX Runtime integration is missing."""
    from sentence_transformers import SentenceTransformer

    try:
        import onnxruntime as ort
    except ImportError:
        return {}
    try:
        import optimum.onnxruntime  # noqa: F401
        from sentence_transformers import export_dynamic_quantized_onnx_model, export_optimized_onnx_model
    except ImportError:
        return {"ort-export": OrtExport(path, threads, max_seq_length)}

    def load(folder: Path, file_name: str | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        kwargs = {"provider": "CPUExecutionProvider", "session_options": options}
        if file_name:
            kwargs["file_name"] = file_name
        model = SentenceTransformer(str(folder), device="cpu", backend="onnx", model_kwargs=kwargs)
        model.max_seq_length = max_seq_length
        return model

    systems = {}
    with tempfile.TemporaryDirectory() as tmp, quiet():
        # ST exports into the model folder; work on a copy so the source stays untouched. ORT reads each
        # file when its session starts, so the folder may go afterwards.
        folder = Path(tmp) / "m"
        shutil.copytree(path, folder)
        systems["st-onnx"] = load(folder)
        for level in optimized:
            export_optimized_onnx_model(systems["st-onnx"], level, str(folder))
            systems[f"st-onnx-{level}"] = load(folder, f"onnx/model_{level}.onnx")
        if int8:
            config = onnx_int8_config()
            export_dynamic_quantized_onnx_model(systems["st-onnx"], config, str(folder))
            systems["st-onnx-int8"] = load(folder, f"onnx/model_qint8_{config}.onnx")
    return systems


def st_openvino(path: Path, threads: int, max_seq_length: int, dtype: torch.dtype):
    """sentence-transformers' ``backend="openvino"`` at ``dtype`` (f32 or bf16 inference precision), or
    None when optimum-intel is missing."""
    from sentence_transformers import SentenceTransformer

    try:
        import optimum.intel  # noqa: F401
    except ImportError:
        return None
    precision = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp, quiet():
        shutil.copytree(path, Path(tmp) / "m")
        model = SentenceTransformer(str(Path(tmp) / "m"), device="cpu", backend="openvino",
                                    model_kwargs={"ov_config": config})
    model.max_seq_length = max_seq_length
    return model


def st_openvino_int8(path: Path, threads: int, max_seq_length: int, calibration: list[str]):
    """sentence-transformers' ``export_static_quantized_openvino_model`` (NNCF post-training static int8,
    its default ``OVQuantizationConfig``) calibrated on ``calibration`` instead of its default set, GLUE
    SST-2 from the Hugging Face hub (unreachable offline, and English): the same export with the dataset
    loader answering with these texts, run through the same preprocessing (padding to 384 tokens).
    None when optimum-intel, NNCF or datasets are missing."""
    from unittest import mock

    from sentence_transformers import SentenceTransformer

    try:
        import datasets
        from optimum.intel.openvino import OVQuantizer
        from sentence_transformers import export_static_quantized_openvino_model
    except ImportError:
        return None

    def local_set(self, dataset_name, dataset_config_name=None, preprocess_function=None, num_samples=None, **_):
        data = datasets.Dataset.from_dict({"sentence": calibration[:num_samples]})
        return data.map(lambda rows: preprocess_function(rows), batched=True, remove_columns=["sentence"])

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads)}
    # Its own fp32 model to export from: the quantizer replaces the OpenVINO graph of the model it is given.
    fp32_model = st_openvino(path, threads, max_seq_length, torch.float32)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        folder = Path(tmp) / "m"
        shutil.copytree(path, folder)
        with mock.patch.object(OVQuantizer, "get_calibration_dataset", local_set):
            export_static_quantized_openvino_model(fp32_model, None, str(folder))
        model = SentenceTransformer(str(folder), device="cpu", backend="openvino", model_kwargs={
            "ov_config": config, "file_name": "openvino/openvino_model_qint8_quantized.xml"})
    model.max_seq_length = max_seq_length
    return model


@contextlib.contextmanager
def quiet():
    """Exporters print progress and warnings; the benchmark's output keeps only its results."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


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
    return float(sum(L * 2 * params * t for t in lengths)) + attention_flops(lengths, cfg)


def attention_flops(lengths: list[int], cfg) -> float:
    """The attention part of ``flops``: q k^T and the weighted sum of v, 4 * T^2 * C per sequence and layer."""
    return float(sum(cfg.num_hidden_layers * 4 * t * t * cfg.hidden_size for t in lengths))


def peak_size(device: str) -> int:
    """The side of the square GEMM ``matmul_peak`` times: 8192 on a GPU (enough to fill a big one), else 2048."""
    return 8192 if device != "cpu" else 2048


def matmul_peak(dtype: torch.dtype, device: str = "cpu", repeats: int = 5) -> float:
    """Best GFLOP/s of a square GEMM of side ``peak_size(device)`` on ``device`` (on the CPU: F.linear
    (MKL) or oneDNN, whichever is faster)."""
    from minisbert.fast.linear import mkldnn_usable

    size = peak_size(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    runs = [lambda: torch.nn.functional.linear(a, b)]
    if device == "cpu" and mkldnn_usable(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b)
        runs.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    return 2 * size**3 / best_seconds(runs, device, repeats) / 1e9


def int8_peak(repeats: int = 5) -> float:
    """Best GOP/s of minisbert's int8 GEMM alone (oneDNN's int8 linear, int32 sums, no quantization of the
    input, no scales) at 2048^3."""
    from minisbert.fast.linear import Linear

    size = peak_size("cpu")
    lin = Linear(torch.randn(size, size), None, "int8")
    q = torch.randint(-127, 128, (size, size), dtype=torch.int8)
    run = lambda: torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, lin.weight, lin.scale, lin.zero, None, 1.0, 0,
                                                     torch.float32, "none", [], "")
    return 2 * size**3 / best_seconds([run], "cpu", repeats) / 1e9


class GemmsAlone:
    """The fast path's linear layers and nothing else, at the shapes it runs them for these texts.

    The 2048^3 peak is a rate the encoder's own GEMMs (768 -> 2304, 768 -> 768, 768 -> 3072, 3072 -> 768
    on a batch's tokens) do not reach: on the Intel Xeon they ran at 73-82% of it in this benchmark's runs
    (docs/performance.md; ``scripts/gemm_shapes.py`` times single shapes).
    This runs minisbert's own ``Linear`` objects (every layer's prepacked weights, fused GELU and residual
    epilogues) on random inputs with the row counts the fast path forms: its token batches, each rounded up
    to ``linear.ROWS``, the FFN in ``PackedBlock.ffn_rows`` chunks. No tokenizer, attention, LayerNorm,
    packing or pooling. Timed in the same interleaved turns as the systems; its time plus the attention
    FLOPs at the peak is the GEMM bound, the fastest this machine's GEMM library runs these linears.
    """

    def __init__(self, encoder, lengths: dict[str, int]):
        self.forward = encoder.runner.forward
        self.blocks = self.forward.blocks
        self.lengths, self.max_tokens, self.step = lengths, encoder.max_seq_length, self.blocks[0].ffn_rows
        self.width = self.blocks[0].attn_ln.weight.shape[0]
        self.inputs: dict[int, torch.Tensor] = {}

    def rows(self, texts: list[str], batch_size: int) -> list[int]:
        """Row count of each GEMM input the fast path forms for ``texts`` (one per token batch)."""
        from minisbert.fast.packing import token_batches

        ids = [range(self.lengths[t]) for t in texts]  # only the lengths matter
        multiple = self.forward.rows_multiple
        return [-(-sum(len(ids[i]) for i in batch) // multiple) * multiple
                for batch in token_batches(ids, batch_size, self.max_tokens)]

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> None:
        with torch.inference_mode():
            for n in self.rows(texts, batch_size):
                if n not in self.inputs:
                    self.inputs[n] = torch.randn(n, self.width, dtype=self.blocks[0].attn_ln.weight.dtype)
                x = self.inputs[n]
                for block in self.blocks:  # as PackedBlock.__call__, minus everything but the linears
                    block.qkv(x)
                    block.out.add(x, x)
                    if n <= self.step:
                        block.down.add(block.up(x), x)
                    else:
                        for s in range(0, n, self.step):  # the residual add there is a pass of its own
                            block.down(block.up(x[s: s + self.step]))


def best_seconds(runs, device: str, repeats: int) -> float:
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
    return best


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-bert", help="folder, hub id, or random-bert/-roberta/-deberta")
    p.add_argument("--tiny", action="store_true", help="with random-*: a tiny model (for smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantize", choices=["int8"], help="also run minisbert's int8 modes, dynamic and static "
                   "(calibrated on calibration_texts), and the int8 peers (ONNX dynamic, OpenVINO static)")
    p.add_argument("--bf16", action="store_true",
                   help="also minisbert and OpenVINO in bf16 beside the run's dtype (fast where bf16 is native)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--texts", default="mixed", choices=WORKLOADS,
                   help="mixed: sentences and one passage in five; passages: every text a passage (long texts)")
    p.add_argument("--n", type=int, default=256, help="number of texts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0,
                   help="texts per interleaving step (default 0: the whole set; smaller interleaves finer but "
                        "shrinks the set sentence-transformers sorts by length, so it pads more)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime systems")
    p.add_argument("--onnx-optimized", default="O3", metavar="LEVELS",
                   help="comma-separated optimisation levels of export_optimized_onnx_model to run (O1-O3; '' none)")
    p.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO system")
    p.add_argument("--no-reference", action="store_true", help="skip minisbert's reference (fast=False) path")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout)")
    return p.parse_args(argv)


def cpu_info() -> dict:
    kind = cpu_kind()
    return {"model_name": kind.model_name, "family": kind.family, "model": kind.model,
            "torch_capability": kind.capability, "flags": list(kind.flags) if kind.flags is not None else None,
            "cpus": os.cpu_count(), "describe": kind.describe(), "bf16": kind.bf16_advice()}


def spread(values: list[float], digits: int = 2) -> str:
    """'min-max' of the per-pass values."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if len(values) > 1 else f"{values[0]:.{digits}f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    load_start = os.getloadavg()

    from minisbert import SentenceEncoder

    path = build_random(args.model, args.max_seq_length, args.tiny) if args.model in RANDOM else args.model
    texts = workload(args.n, kind=args.texts)

    ours = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, fast=True)
    ours.max_seq_length = min(args.max_seq_length, ours.max_seq_length)
    lengths = [len(ids) for ids in ours.tokenizer.encode_ids(texts)]
    systems = {f"minisbert[{ours.runner.forward.backend}]": ours}
    calibration = calibration_texts(kind=args.texts)
    if args.quantize:
        int8 = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, quantize=args.quantize)
        int8.max_seq_length = ours.max_seq_length
        systems[f"minisbert[{args.quantize}]"] = int8
        if onednn_int8_usable():
            # Static int8: every linear's input range measured once on the calibration texts in fp32.
            static = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, quantize=args.quantize)
            static.max_seq_length = ours.max_seq_length
            with ours.runner.forward.observe() as ranges:
                ours.encode(calibration, batch_size=args.batch_size)
            static.runner.forward.use_ranges(ranges)
            systems[f"minisbert[{args.quantize}-static]"] = static
    if args.bf16:
        half = SentenceEncoder.from_pretrained(path, device=args.device, dtype=torch.bfloat16, fast=True)
        half.max_seq_length = ours.max_seq_length
        systems["minisbert[bf16]"] = half
    if not args.no_reference:
        ref = SentenceEncoder.from_pretrained(path, device=args.device, dtype=dtype, fast=False)
        ref.max_seq_length = ours.max_seq_length
        systems["minisbert-reference"] = ref
    st_folder = Path(ours.source if args.model not in RANDOM else path)
    systems["st"] = st_torch(st_folder, args.device, dtype, ours.max_seq_length)
    if not args.no_onnx and args.device == "cpu":
        levels = [level for level in args.onnx_optimized.split(",") if level]
        systems.update(onnx_systems(st_folder, threads, ours.max_seq_length, levels, bool(args.quantize)))
    if not args.no_openvino and args.device == "cpu":
        model = st_openvino(st_folder, threads, ours.max_seq_length, dtype)
        if model is not None:
            systems["st-openvino"] = model
            if args.bf16:
                systems["st-openvino-bf16"] = st_openvino(st_folder, threads, ours.max_seq_length, torch.bfloat16)
            if args.quantize:
                static = st_openvino_int8(st_folder, threads, ours.max_seq_length, calibration)
                if static is not None:
                    systems["st-openvino-int8"] = static

    times = {name: [] for name in systems}
    # The GEMM bound's timing, on the CPU where the fast path runs its linears through ``fast.Linear``.
    gemms = GemmsAlone(ours, dict(zip(texts, lengths))) if args.device == "cpu" and ours.fast else None
    gemm_times = []
    for model in systems.values():  # warm-up
        model.encode(texts[: args.batch_size * 2], batch_size=args.batch_size)
    if gemms:
        gemms.encode(texts, batch_size=args.batch_size)  # every row count once: oneDNN builds a kernel per shape
    outputs = {name: [] for name in systems}  # the first repetition's embeddings, compared below
    # Interleaved per chunk of texts, not per pass, so a burst of other work on a shared machine hits
    # every system alike; a system's time for one pass is the sum over chunks, reported as the median
    # over repeats.
    chunk = args.chunk or len(texts)
    for _ in range(args.repeats):
        spent, gemm_spent = dict.fromkeys(systems, 0.0), 0.0
        for start in range(0, len(texts), chunk):
            for name, model in systems.items():
                t = time.perf_counter()
                emb = model.encode(texts[start: start + chunk], batch_size=args.batch_size)
                spent[name] += time.perf_counter() - t
                if len(times[name]) == 0:
                    outputs[name].append(np.asarray(emb, dtype=np.float32))
            if gemms:
                t = time.perf_counter()
                gemms.encode(texts[start: start + chunk], batch_size=args.batch_size)
                gemm_spent += time.perf_counter() - t
        for name in systems:
            times[name].append(spent[name])
        if gemms:
            gemm_times.append(gemm_spent)
    outputs = {name: np.concatenate(parts) for name, parts in outputs.items()}
    load_end = os.getloadavg()

    fp32_st = outputs["st"]
    if dtype != torch.float32:
        # Agreement is judged against the fp32 sentence-transformers embedding of every text.
        fp32_st = np.asarray(st_torch(st_folder, args.device, torch.float32, ours.max_seq_length).encode(
            texts, batch_size=args.batch_size), dtype=np.float32)
    total_flops = flops(lengths, ours.model.config)
    peaks = {} if args.no_peak else {"fp32": matmul_peak(torch.float32, args.device)}
    if not args.no_peak and dtype != torch.float32:
        peaks[args.dtype] = matmul_peak(dtype, args.device)
    if not args.no_peak and args.quantize and onednn_int8_usable():
        peaks["int8"] = int8_peak()
    peak = peaks[args.dtype if dtype != torch.float32 else "fp32"] * 1e9 if peaks else None
    bound = total_flops / peak if peaks else None
    attention = attention_flops(lengths, ours.model.config)
    # The GEMM bound: the linears at the rate this machine's GEMM library reaches at their own shapes,
    # attention (a few % of the FLOPs at 128 tokens) still at the big-matmul peak.
    gemm_bound = statistics.median(gemm_times) + attention / peak if gemm_times and peak else None
    rows = []
    for name in systems:
        t = statistics.median(times[name])
        a, b = outputs[name], fp32_st
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        rows.append({"system": name, "seconds": t, "all_seconds": times[name], "sentences_per_s": len(texts) / t,
                     "sentences_per_s_per_pass": [len(texts) / x for x in times[name]],
                     "tokens_per_s": sum(lengths) / t, "gflops": total_flops / t / 1e9,
                     "percent_of_flop_bound": 100 * bound / t if bound else None,
                     "percent_of_gemm_bound": 100 * gemm_bound / t if gemm_bound else None,
                     "max_abs_diff_vs_st": float(np.abs(a - b).max()), "min_cosine_vs_st": float(cos.min())})
    by_name = {r["system"]: r for r in rows}
    onnx_name = next((n for n in ("st-onnx", "ort-export") if n in by_name), None)
    for r in rows:
        r["vs_st"] = by_name["st"]["seconds"] / r["seconds"]
        r["vs_onnx"] = by_name[onnx_name]["seconds"] / r["seconds"] if onnx_name else None
        # The same ratio within each pass (the systems' turns of one pass are minutes apart at most),
        # so a machine that speeds up or slows down between passes moves both sides of it.
        r["vs_st_per_pass"] = [st / own for st, own in zip(times["st"], times[r["system"]])]
    comparisons = {}
    if args.quantize:
        name = f"minisbert[{args.quantize}]"
        fp32_name = next(iter(systems))
        peers = [n for n in ("st-onnx-int8", "st-openvino-int8") if n in systems]
        against = [fp32_name] + peers + [n for n in systems if n not in (name, fp32_name, *peers)]
        for other in against:  # int8 against minisbert fp32, the int8 peers, then everything else
            comparisons[f"{name} vs {other}"] = [o / own for o, own in zip(times[other], times[name])]
        static = f"{name[:-1]}-static]"
        for other in [fp32_name, name] + peers if static in systems else []:
            comparisons[f"{static} vs {other}"] = [o / own for o, own in zip(times[other], times[static])]
    if "minisbert[bf16]" in systems:
        for other in [n for n in ("st-openvino-bf16", next(iter(systems))) if n in systems]:
            comparisons[f"minisbert[bf16] vs {other}"] = [o / own for o, own in zip(times[other],
                                                                                  times["minisbert[bf16]"])]
    kind = cpu_kind()
    result = {"model": str(args.model), "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
              "threads": threads, "batch_size": args.batch_size, "max_seq_length": ours.max_seq_length,
              "texts": args.texts, "n": len(texts), "tokens": sum(lengths), "repeats": args.repeats,
              "chunk": args.chunk, "cpu": cpu_info(),
              "loadavg": {"start": list(load_start), "end": list(load_end)}, "peak_gflops": peaks,
              "onnx_system": onnx_name, "torch": torch.__version__, "versions": versions(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows, "per_pass_ratios": comparisons}
    if bound:
        # The fastest any system could run these real tokens' FLOPs on this machine: what is left to win.
        result["flop_bound"] = {"seconds": bound, "sentences_per_s": len(texts) / bound,
                                "vs_st": by_name["st"]["seconds"] / bound,
                                "vs_onnx": by_name[onnx_name]["seconds"] / bound if onnx_name else None}
    if gemm_times:
        linear_flops = total_flops - attention
        result["gemms_alone"] = {"seconds": statistics.median(gemm_times), "all_seconds": gemm_times,
                                 "gflops": linear_flops / statistics.median(gemm_times) / 1e9}
    if gemm_bound:
        result["gemm_bound"] = {"seconds": gemm_bound, "sentences_per_s": len(texts) / gemm_bound,
                                "vs_st": by_name["st"]["seconds"] / gemm_bound,
                                "percent_of_flop_bound": 100 * bound / gemm_bound}

    print(f"{args.model}  {args.dtype} on {args.device}, {threads} threads, batch {args.batch_size}, "
          f"max_seq_length {ours.max_seq_length}, {len(texts)} {args.texts} texts / {sum(lengths)} tokens, "
          f"median of {args.repeats} (interleaved every {args.chunk or len(texts)} texts), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"CPU: {kind.describe()}, {os.cpu_count()} logical CPUs; {kind.bf16_advice()}")
    print(f"load average (1/5/15 min): {' '.join(f'{x:.1f}' for x in load_start)} before, "
          f"{' '.join(f'{x:.1f}' for x in load_end)} after"
          + ("  << busy machine: read the ratios within passes, not the absolute speeds"
             if max(load_start[0], load_end[0]) > 1.5 * (os.cpu_count() or 1) else ""))
    print(f"{'system':<22}{'sent/s':>9}{'passes':>16}{'vs ST':>7}{'passes':>11}{'vs ONNX':>8}{'GFLOP/s':>8}"
          f"{'%bound':>7}{'%gemm':>6}{'max|diff|':>10}{'min cos':>10}")
    for r in rows:
        vs_onnx = f"{r['vs_onnx']:.2f}" if r["vs_onnx"] else "-"
        share = f"{r['percent_of_flop_bound']:.0f}" if r["percent_of_flop_bound"] else "-"
        gemm_share = f"{r['percent_of_gemm_bound']:.0f}" if r["percent_of_gemm_bound"] else "-"
        print(f"{r['system']:<22}{r['sentences_per_s']:>9.1f}{spread(r['sentences_per_s_per_pass'], 1):>16}"
              f"{r['vs_st']:>7.2f}{spread(r['vs_st_per_pass']):>11}{vs_onnx:>8}{r['gflops']:>8.1f}{share:>7}{gemm_share:>6}"
              f"{r['max_abs_diff_vs_st']:>10.2e}{r['min_cosine_vs_st']:>10.6f}")
    if args.repeats > 1:
        print("vs ST within each pass: " + "; ".join(
            f"{r['system']} " + " ".join(f"{x:.2f}" for x in r["vs_st_per_pass"]) for r in rows if r["system"] != "st"))
    for label, ratios in comparisons.items():
        # best of N: each side's fastest pass, the figure least moved by other work on a shared machine
        own, other = label.split(" vs ")
        best = min(times[other]) / min(times[own])
        print(f"{label}: {statistics.median(ratios):.2f}x (passes {' '.join(f'{x:.2f}' for x in ratios)}; "
              f"best of {args.repeats} {best:.2f}x)")
    if peaks:
        print(f"matmul peak ({peak_size(args.device)}^3 GEMM): "
              + ", ".join(f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in peaks.items()))
        fb = result["flop_bound"]
        print(f"FLOP bound (every FLOP of the real tokens at the {args.dtype} peak, nothing else): "
              f"{fb['sentences_per_s']:.1f} sent/s = {fb['vs_st']:.2f}x st"
              + (f" = {fb['vs_onnx']:.2f}x {onnx_name}" if fb["vs_onnx"] else ""))
    if gemm_times:
        ga = result["gemms_alone"]
        print(f"minisbert's linears alone at this workload's shapes: {ga['gflops']:.0f} GFLOP/s"
              + (f" ({100 * ga['gflops'] * 1e9 / peak:.0f}% of the peak)" if peak else "")
              + f", passes {spread(gemm_times, 3)} s")
    if gemm_bound:
        gb = result["gemm_bound"]
        print(f"GEMM bound (those linears + attention at the peak, nothing else): {gb['sentences_per_s']:.1f} "
              f"sent/s = {gb['vs_st']:.2f}x st = {gb['percent_of_flop_bound']:.0f}% of the FLOP bound")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return result


def versions() -> dict:
    """Versions of the peers' packages that are installed."""
    from importlib import metadata

    out = {}
    for name in ("sentence-transformers", "transformers", "onnxruntime", "optimum", "optimum-onnx", "optimum-intel",
                 "openvino"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
