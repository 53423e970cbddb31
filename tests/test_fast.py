"""The fast path (minisbert/fast/) and the pooling kernels (minisbert/modules/kernels.py) against the reference."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, corpus, load_script, make_checkpoint, st_model

from minisbert import SentenceEncoder
from minisbert.fast.deberta_v2 import diagonals, is_shift
from minisbert.fast.int8 import onednn_int8_usable
from minisbert.fast.linear import mkldnn_usable
from minisbert.fast.packing import Packing, token_batches
from minisbert.fast.runner import PackedRunner, fast_forward
from minisbert.modules import kernels
from minisbert.runner import ReferenceRunner, padded_length

TOL = 1e-5
ARCHS = ["bert", "roberta", "deberta-v2"]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------------------------------
# Pooling kernels


def st_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling as its Pooling module writes it (the specification): expand
    the mask, multiply, sum (in float32 for half inputs), divide by the count clamped at 1e-9."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    expanded = mask.unsqueeze(-1).expand(x.size()).to(acc)
    return ((x.to(acc) * expanded).sum(1) / expanded.sum(1).clamp(min=1e-9)).to(x.dtype)


def test_masked_mean_hand_sized():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])  # (B=2, T=3, C=2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[2.0, 3.0], [7.0, 8.0]])
    assert torch.equal(kernels.masked_mean(x, mask), expected)
    assert torch.equal(kernels.packed_mean_pool(x[mask.bool()], mask.sum(1)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_mean_equals_reference_random(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 13, 32, generator=g).to(dtype)
    lengths = torch.tensor([13, 1, 5, 0, 12, 7, 0])  # two all-pad rows
    mask = (torch.arange(13)[None, :] < lengths[:, None]).long()
    ref = st_mean(x, mask)
    for ours in (kernels.masked_mean(x, mask), kernels.packed_mean_pool(x[mask.bool()], lengths)):
        assert ours.dtype == dtype
        tol = TOL if dtype == torch.float32 else 1e-2  # one rounding of the fp32 mean to half precision
        diff = (ours.float() - ref.float()).abs()
        assert diff.max() <= tol, f"{dtype}: max {diff.max():.3e} mean {diff.mean():.3e}"
    # An all-pad row gives zeros (the 1e-9 clamp), never NaN.
    assert torch.equal(kernels.masked_mean(x, mask)[3].float(), torch.zeros(32))
    assert torch.equal(kernels.packed_mean_pool(x[mask.bool()], lengths)[6].float(), torch.zeros(32))


def test_half_inputs_accumulate_in_fp32():
    # 4096 copies of 1 + 2^-8: a bf16 running sum would stall at 256 long before the end.
    x = torch.full((1, 4096, 4), 1 + 2**-8, dtype=torch.bfloat16)
    mask = torch.ones(1, 4096, dtype=torch.long)
    assert torch.equal(kernels.masked_mean(x, mask), x[:, 0])
    assert torch.equal(kernels.packed_mean_pool(x[0], torch.tensor([4096])), x[:, 0])


@pytest.mark.slow  # inductor's first C++ compile takes a minute or more on 2 shared cores
def test_compiled_pooling_on_cpu():
    x = torch.randn(3, 9, 16)
    mask = (torch.arange(9)[None, :] < torch.tensor([[9], [4], [0]])).long()
    try:
        ours = kernels.compiled(kernels.masked_mean)(x, mask)
    except Exception as e:  # noqa: BLE001 - no working C++ toolchain for inductor
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}")
    diff = (ours - st_mean(x, mask)).abs()
    assert diff.max() <= TOL, f"compiled pooling: max {diff.max():.3e} mean {diff.mean():.3e}"
    packed = kernels.compiled(kernels.packed_mean_pool)(x[mask.bool()], mask.sum(1))
    diff = (packed - st_mean(x, mask)).abs()
    assert diff.max() <= TOL, f"compiled packed pooling: max {diff.max():.3e} mean {diff.mean():.3e}"
    # Through the public entry points, over shapes that dynamic shapes alone would specialise (sizes 1):
    # one graph per function serves them all, far from dynamo's recompile limit, so nothing falls back.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(1)
    for B, T in ((4, 10), (1, 3), (2, 1), (1, 1), (17, 33)):
        x = torch.randn(B, T, 16, generator=g)
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        ref = st_mean(x, mask)
        assert (kernels.mean_pool(x, mask, compile=True) - ref).abs().max() <= TOL, (B, T)
        assert (kernels.packed_mean(x[mask.bool()], lengths, compile=True) - ref).abs().max() <= TOL, (B, T)
    assert not kernels.compile_failures()
    assert counters["stats"]["unique_graphs"] - graphs <= 2, "a pooling kernel was recompiled for a new shape"


def test_packing_round_trip_hand_sized():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    layout = Packing(mask)
    x = torch.arange(1.0, 7.0).view(2, 3, 1)  # (B, T, 1)
    packed = layout.unpad([x])
    assert packed.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    # Pads hold a copy of the group's first token (finite; attention and pooling mask them).
    assert layout.pad(packed)[0].flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 1.0, 1.0]
    assert layout.lengths.tolist() == [3, 1]


def test_packing_groups_of_different_lengths_hand_sized():
    masks = [torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([[1, 0, 0, 0, 0]])]  # (2, 3) and (1, 5)
    layout = Packing(masks)
    xs = [torch.arange(1.0, 7.0).view(2, 3, 1), torch.arange(10.0, 15.0).view(1, 5, 1)]
    packed = layout.unpad(xs)
    assert packed.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    back = layout.pad(packed)
    assert [tuple(t.shape) for t in back] == [(2, 3, 1), (1, 5, 1)]
    assert back[0].flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 1.0]
    assert back[1].flatten().tolist() == [10.0, 10.0, 10.0, 10.0, 10.0]
    assert layout.lengths.tolist() == [3, 2, 1]


def test_packing_full_groups_are_views_hand_sized():
    masks = [torch.tensor([[1, 1], [1, 1]]), torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1, 1]])]  # full, not, full
    layout = Packing(masks, rows_multiple=4)
    assert layout.full == [True, False, True] and (layout.n, layout.rows) == (9, 12)
    xs = [torch.arange(1.0, 5.0).view(2, 2, 1), torch.arange(10.0, 13.0).view(1, 3, 1),
          torch.arange(20.0, 23.0).view(1, 3, 1)]
    packed = layout.unpad(xs)
    assert packed.flatten().tolist() == [1, 2, 3, 4, 10, 11, 20, 21, 22, 20, 20, 20]
    back = layout.pad(packed)
    assert back[0].data_ptr() == packed.data_ptr() and back[2].data_ptr() == packed[6:].data_ptr()  # no copies
    assert [t.flatten().tolist() for t in back] == [[1, 2, 3, 4], [10, 11, 10], [20, 21, 22]]


def test_packing_filler_rows_hand_sized():
    """rows_multiple pads the packed layout once: filler rows copy the last group's first real token,
    ``pad`` ignores them, and the runner hands back only the N real rows."""
    masks = [torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([[1, 0, 0, 0, 0]])]
    layout = Packing(masks, rows_multiple=4)
    assert (layout.n, layout.rows) == (6, 8)
    xs = [torch.arange(1.0, 7.0).view(2, 3, 1), torch.arange(10.0, 15.0).view(1, 5, 1)]
    packed = layout.unpad(xs)
    assert packed.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 10.0, 10.0]
    assert layout.pad(packed)[0].flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 1.0]
    assert Packing(masks, rows_multiple=3).rows == 6  # already a multiple: no filler


def packed_embed(encoder: SentenceEncoder, texts: list[str], forward=None, batch_size: int = 32,
                 **options) -> np.ndarray:
    """(N, C) pooled vectors of ``texts`` in input order, through a ``PackedRunner`` over ``forward``
    (default: ``fast_forward(encoder.model, **options)``, the variant a test compares), batched as
    ``encode`` batches them."""
    forward = forward or fast_forward(encoder.model, **options)
    runner = PackedRunner(forward, encoder.tokenizer.pad_id, encoder.pooling.modes, encoder.max_tokens)
    ids = encoder.tokenizer.encode_ids(texts)
    rows = [None] * len(texts)
    with torch.inference_mode():
        for batch in runner.batches(ids, batch_size, encoder.max_seq_length):
            for i, row in zip(batch, runner.embed([ids[i] for i in batch])):
                rows[i] = row
    return torch.stack(rows).numpy()


def test_packed_embed_is_what_encode_pools(tiny_models):
    """The tests' variant runner gives the default fast path's own vectors (the tiny BERT has no modules
    after Pooling), so comparing variants through it compares what ``encode`` would return."""
    encoder = load(tiny_models, "bert")
    runner_or_skip(encoder, "bert")
    texts = corpus(40)
    assert max_diff(packed_embed(encoder, texts), encoder.encode(texts)) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_returns_real_rows_only(arch, tiny_models):
    encoder = load(tiny_models, arch)
    runner_or_skip(encoder, arch)
    groups = [encoder.tokenizer.pad(encoder.tokenizer.encode_ids(corpus(5)), "cpu")]
    x, layout = fast_forward(encoder.model, rows_multiple=32)(groups)  # filler rows whatever the backend
    assert layout.rows % 32 == 0 and layout.rows > layout.n
    assert x.shape[0] == layout.n == int(groups[0][1].sum())
    y, _ = fast_forward(encoder.model, rows_multiple=1)(groups)
    assert max_diff(x, y) <= TOL  # filler rows do not touch the real ones


def test_deberta_attention_chunks_equal_whole_groups(tiny_models):
    """Attention in chunks of texts (the CPU's cache-sized chunks) is the same function as whole groups."""
    encoder = load(tiny_models, "deberta-v2")
    runner_or_skip(encoder, "deberta-v2")
    texts = corpus(40)
    whole = packed_embed(encoder, texts, chunk_bytes=1 << 40)  # one chunk per group
    assert max_diff(packed_embed(encoder, texts, chunk_bytes=1), whole) <= TOL  # one text per chunk


def test_deberta_relative_gemm_widths(tiny_models, monkeypatch):
    """The c2p/p2c GEMMs take the reachable table rows rounded up to ``round_to`` (cut at the table's
    end); the extra columns are never read, so the embeddings equal those of the exact widths."""
    encoder = load(tiny_models, "deberta-v2")
    runner_or_skip(encoder, "deberta-v2")
    texts = corpus(40)
    widths = []
    matmul = torch.matmul

    def recording(a, b):
        widths.append(b.shape[-1])
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", recording)  # records every GEMM width, changes nothing
    exact = packed_embed(encoder, texts, round_to=1)
    assert any(w % 16 for w in widths)  # odd widths 2T - 1 without the rounding
    widths.clear()
    assert max_diff(packed_embed(encoder, texts, round_to=16), exact) <= TOL
    assert widths and all(w % 16 == 0 for w in widths)  # these texts stay far from the table's end


def test_relative_shift_by_hand():
    """Plain distances make c2p/p2c strided views of the relative-score GEMM outputs."""
    from minisbert.models.deberta_v2 import relative_positions

    # kf-deberta: 256 log buckets (distances up to 131 keep their own row), table of 2 * 256 rows.
    assert is_shift(relative_positions(128, 256, 256, 512))
    assert is_shift(relative_positions(132, 256, 256, 512))
    assert not is_shift(relative_positions(133, 256, 256, 512))  # distances 131 and 132 share a bucket
    assert not is_shift(relative_positions(12, 4, -1, 512))  # no buckets, table of 8 rows: clamped
    # One text, T = 3, width 6 (rows hold distances 2, 1, 0, -1, -2, then an unread column):
    # [i, j] = row i's column 2 - i + j.
    scores = torch.arange(18.0).view(1, 3, 6)
    view = diagonals(scores, b=1, T=3)
    assert view.tolist() == [[[[2.0, 3.0, 4.0], [7.0, 8.0, 9.0], [12.0, 13.0, 14.0]]]]
    assert view.data_ptr() == scores.data_ptr() + 2 * scores.element_size()  # a view, not a copy
    # Two texts: the second starts T * W elements later.
    assert diagonals(torch.arange(36.0).view(1, 6, 6), b=2, T=3)[0, 1, 0].tolist() == [20.0, 21.0, 22.0]


def test_deberta_relative_shift_equals_gather(tiny_models):
    """Strided views of the c2p/p2c scores (upside-down key table for c2p) equal the gathers they
    replace (bit for bit on the machines measured; the GEMM may round a column differently elsewhere),
    and are what runs for short texts."""
    encoder = load(tiny_models, "deberta-v2")
    runner_or_skip(encoder, "deberta-v2")
    texts = corpus(40)
    gathering = fast_forward(encoder.model, relative_shift=False)
    shifting = fast_forward(encoder.model)
    gathered, shifted = packed_embed(encoder, texts, gathering), packed_embed(encoder, texts, shifting)
    lengths = {padded_length(len(ids), encoder.max_tokens) for ids in encoder.tokenizer.encode_ids(texts)}
    # Each padded length's attention takes strided views exactly where its relative positions are a shift.
    views = [T for T in lengths if shifting.relative(T)[1]]
    assert views and max(views) <= 128
    assert not any(gathering.relative(T)[1] for T in lengths)
    assert max_diff(shifted, gathered) <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_ffn_row_chunks_equal_whole_batch(arch, tiny_models):
    """The CPU's FFN row chunks (with the residual added in place) are the same function as one pass."""
    encoder = load(tiny_models, arch)
    runner_or_skip(encoder, arch)
    texts = corpus(40)
    whole = packed_embed(encoder, texts, ffn_rows=0)
    assert max_diff(packed_embed(encoder, texts, ffn_rows=32), whole) <= TOL  # several chunks and a tail per batch


def test_token_batches_hand_sized():
    ids = [[0] * n for n in (3, 10, 2, 10, 5, 1)]
    # Budget 2 * 10 = 20 real tokens: [10, 10], then 5 + 3 + 2 + 1.
    assert token_batches(ids, batch_size=2, max_seq_length=10) == [[1, 3], [4, 0, 2, 5]]
    assert sorted(i for b in token_batches(ids, 1, 4) for i in b) == list(range(6))  # every text once
    # Filled by real tokens, not by a (rows x longest) rectangle: 9 + 8 + 8 + 8 + 7 = 40 fits a budget of 40.
    ids = [[0] * n for n in (9, 8, 8, 8, 7, 5)]
    assert token_batches(ids, batch_size=4, max_seq_length=10) == [[0, 1, 2, 3, 4], [5]]


# ---------------------------------------------------------------------------------------------------
# Fast path against the reference path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        try:
            out[arch] = make_checkpoint(tmp_path_factory.mktemp(arch), arch, max_seq_length=128)
        except Exception as e:  # noqa: BLE001 - transformers without this architecture
            out[arch] = e
    return out


def load(tiny_models, arch, **kwargs) -> SentenceEncoder:
    path = tiny_models[arch]
    if isinstance(path, Exception):
        pytest.skip(f"no tiny {arch}: {path}")
    try:
        return SentenceEncoder.from_pretrained(path, **kwargs)
    except ValueError as e:
        pytest.skip(f"{arch} is not loadable yet: {e}")


def runner_or_skip(encoder: SentenceEncoder, arch: str):
    if not encoder.fast:
        pytest.skip(f"no fast path for {arch}")


@pytest.mark.parametrize("arch, backend", [(a, "aten") for a in ARCHS] + [("bert", "mkldnn"), ("deberta-v2", "mkldnn")])
def test_fast_equals_reference(arch, backend, tiny_models, monkeypatch):
    if backend == "mkldnn" and not mkldnn_usable(torch.float32):
        pytest.skip("oneDNN linear is not available")
    monkeypatch.setenv("MINISBERT_LINEAR", backend)
    ours = load(tiny_models, arch, fast=True)
    runner_or_skip(ours, arch)
    assert ours.runner.forward.backend == backend
    reference = load(tiny_models, arch, fast=False)
    assert not reference.fast
    texts = corpus(70) + ["", "한국어 " * 300, "a"]
    want = reference.encode(texts, batch_size=32)
    for batch_size, n in ((32, len(texts)), (1, 12)):  # batch 1 on fewer texts: same check, less time
        got = ours.encode(texts[-n:], batch_size=batch_size)
        want = want[-n:]
        assert max_diff(got, want) <= TOL, (f"{arch}/{backend} batch {batch_size}: max {max_diff(got, want):.3e} "
                                            f"mean {np.abs(got - want).mean():.3e}")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_fast_and_reference_equal_sentence_transformers(arch, tiny_models):
    texts = corpus(60) + ["", "한국어 " * 300]
    want = st_model(tiny_models[arch]).encode(texts, batch_size=32)
    for use_fast in (True, False):
        got = load(tiny_models, arch, fast=use_fast).encode(texts, batch_size=32)
        assert max_diff(got, want) <= TOL, f"{arch} fast={use_fast}: max {max_diff(got, want):.3e}"


def test_other_pooling_modes_on_fast_path(tmp_path):
    modes = ("cls", "max", "mean", "lasttoken")
    path = make_checkpoint(tmp_path / "m", "bert", max_seq_length=48, pooling=modes, normalize=True)
    texts = corpus(40) + [""]
    got = SentenceEncoder.from_pretrained(path, fast=True).encode(texts, batch_size=16)
    want = SentenceEncoder.from_pretrained(path, fast=False).encode(texts, batch_size=16)
    assert max_diff(got, want) <= TOL, f"pooling {modes}: max {max_diff(got, want):.3e}"


def test_fast_selection_auto_env_and_override(tiny_models, monkeypatch):
    monkeypatch.delenv("MINISBERT_FAST", raising=False)
    encoder = load(tiny_models, "bert")
    assert encoder.fast  # automatic: on where supported
    encoder.fast = False
    assert not encoder.fast and isinstance(encoder.runner, ReferenceRunner)
    monkeypatch.setenv("MINISBERT_FAST", "0")
    assert not load(tiny_models, "bert").fast
    assert load(tiny_models, "bert", fast=True).fast  # an explicit argument beats the environment


# ---------------------------------------------------------------------------------------------------
# CPU kind and the bf16 warning


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: something else
"""


def test_parse_cpuinfo_hand_sized():
    from minisbert.fast.cpu import CpuKind, parse_cpuinfo

    name, family, model, flags = parse_cpuinfo(CPUINFO)
    assert (name, family, model) == ("Intel(R) Xeon(R) Processor", 6, 167)
    assert flags == ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")  # FLAGS' order
    kind = CpuKind(name, family, model, "AVX512", flags)
    assert kind.native_bf16 and "family 6 model 167" in kind.describe() and "AMX-INT8" in kind.describe()
    zen3 = CpuKind("AMD EPYC 7B13", 25, 1, "AVX2", ("avx2",))
    assert zen3.native_bf16 is False and "int8" in zen3.bf16_advice()
    assert CpuKind("unknown", None, None, "AVX2", None).native_bf16 is None


@pytest.mark.parametrize("flags, warns", [(("avx2", "avx512f"), True), (("avx2", "avx512f", "avx512_bf16"), False),
                                          (("avx2", "avx512f", "amx_bf16"), False)])
def test_bf16_warning_without_native_bf16(flags, warns, tiny_models, caplog):
    """AVX-512 without AVX512_BF16 or AMX-BF16 runs bf16 emulated: that warns too, not only a CPU where
    oneDNN refuses bf16."""
    from minisbert.fast.cpu import CpuKind

    if not mkldnn_usable(torch.bfloat16):
        pytest.skip("oneDNN refuses bf16 here (that case always warns)")
    model = load(tiny_models, "bert", dtype=torch.bfloat16).model
    with caplog.at_level(logging.WARNING, logger="minisbert"):
        fast_forward(model, cpu=CpuKind("test CPU", 6, 85, "AVX512", flags))  # the CPU the warning judges
    said = [r.message for r in caplog.records if "several times slower" in r.message]
    assert bool(said) == warns, said
    if warns:
        assert "quantize='int8'" in said[0]


def test_inspect_says_what_bf16_means_on_this_cpu(tiny_models, monkeypatch, capsys):
    from minisbert import cli
    from minisbert import inspect as inspect_module
    from minisbert.fast.cpu import CpuKind

    monkeypatch.setattr(inspect_module, "cpu_kind", lambda: CpuKind("AMD EPYC 7B13", 25, 1, "AVX2", ("avx2",)))
    assert cli.main(["inspect", "--model", str(tiny_models["bert"])]) == 0
    out = capsys.readouterr().out
    assert "this CPU     AMD EPYC 7B13 (family 25 model 1): AVX2" in out
    assert "bf16 is emulated here" in out and "quantize='int8'" in out
    assert cli.main(["inspect", "--model", str(tiny_models["bert"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu"]["native_bf16"] is False


# ---------------------------------------------------------------------------------------------------
# Threads and fork


def _child_encode(path, queue):
    encoder = SentenceEncoder.from_pretrained(path)
    queue.put(encoder.encode(["포크 뒤에도 인코딩한다.", "두 번째 문장"]).tolist())


def test_encode_after_fork_does_not_deadlock(tiny_models):
    encoder = load(tiny_models, "bert")
    parent = encoder.encode(["포크 뒤에도 인코딩한다.", "두 번째 문장"] + corpus(40))[:2]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_encode, args=(str(tiny_models["bert"]), queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child did not finish encoding within 60 s (deadlock?)")
    assert child.exitcode == 0
    assert max_diff(queue.get(timeout=5), parent) <= TOL


HEAP_CHILD = r"""
import ctypes, sys, torch

from minisbert.fast.heap import raise_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "primed":
    raise_mmap_threshold()
before = libc.mallinfo2().hblkhd
x = torch.ones(20 << 18)  # 20 MiB, the size of a base model's GEMM output
print(libc.mallinfo2().hblkhd - before)  # bytes malloc mapped for it on its own (0: from the heap)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split("."))) < (2, 33),
                    reason="glibc's malloc (mallinfo2 is glibc >= 2.33)")
def test_primed_heap_serves_big_tensors_without_fresh_mappings():
    mapped = {}
    for mode in ("primed", "unprimed"):
        out = subprocess.run([sys.executable, "-c", HEAP_CHILD, mode], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "MINISBERT_HEAP": "1"}, check=True)
        mapped[mode] = int(out.stdout.split()[-1])
    # A fresh process maps a 20 MiB block on its own (page-faulted in, zero-filled, unmapped on free);
    # after priming it comes from the heap, where freed memory is reused.
    assert mapped["unprimed"] >= 20 << 20, mapped
    assert mapped["primed"] == 0, mapped


# A fresh process each (priming is once per process): what the heap module says at each step.
PRIMING_CHILD = r"""
import os, sys
from minisbert.fast import heap

if sys.argv[1] == "runner":
    from minisbert import SentenceEncoder
    from minisbert.fast.runner import fast_forward

    model = SentenceEncoder.from_pretrained(sys.argv[2], fast=False).model
    steps = [heap.primed()]
    fast_forward(model)
    steps.append(heap.primed())
else:
    os.environ["MINISBERT_HEAP"] = "0"
    steps = [heap.raise_mmap_threshold(), heap.primed()]
    del os.environ["MINISBERT_HEAP"]
    steps += [heap.raise_mmap_threshold(), heap.raise_mmap_threshold(), heap.primed()]
print(steps)
"""


def priming_steps(*args) -> list[bool]:
    env = {k: v for k, v in os.environ.items() if k != "MINISBERT_HEAP"}
    out = subprocess.run([sys.executable, "-c", PRIMING_CHILD, *args], capture_output=True, text=True, timeout=120,
                         env=env, check=True)
    return json.loads(out.stdout.split("\n")[-2].lower())


def test_fast_runner_on_cpu_primes_the_heap(tiny_models):
    path = tiny_models["bert"]
    if isinstance(path, Exception):
        pytest.skip(f"no tiny bert: {path}")
    assert priming_steps("runner", str(path)) == [False, True]  # loading does not prime; the fast runner does


def test_heap_priming_once_and_off_by_env():
    # Off by MINISBERT_HEAP=0: nothing primed; then primed by the first call only.
    assert priming_steps("calls") == [False, False, True, False, True]


def test_respects_torch_threads(tiny_models):
    encoder = load(tiny_models, "bert")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        encoder.encode(corpus(20))
        assert torch.get_num_threads() == 1  # nothing in the encode path resets it
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# Benchmark smoke test and GPU


@pytest.mark.slow  # a subprocess that loads torch, sentence-transformers and three systems: ~6 s on 2 free cores
def test_bench_script_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--model", "random-bert", "--tiny",
                           "--n", "12", "--repeats", "2", "--batch-size", "4", "--no-onnx", "--no-openvino",
                           "--no-peak", "--quantize", "int8", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"model", "dtype", "threads", "tokens", "peak_gflops", "rows", "cpu", "loadavg"} <= set(result)
    assert result["cpu"]["model_name"] and len(result["loadavg"]["start"]) == 3
    gemms = result["gemms_alone"]  # the GEMM bound's own timing, one per pass
    assert len(gemms["all_seconds"]) == 2 and gemms["seconds"] > 0 and gemms["gflops"] > 0
    names = [r["system"] for r in result["rows"]]
    assert any(n.startswith("minisbert[") for n in names) and "st" in names and "minisbert[int8]" in names
    for row in result["rows"]:
        assert {"sentences_per_s", "sentences_per_s_per_pass", "tokens_per_s", "vs_st", "vs_st_per_pass", "gflops",
                "max_abs_diff_vs_st", "min_cosine_vs_st"} <= set(row)
        assert row["sentences_per_s"] > 0 and len(row["sentences_per_s_per_pass"]) == 2
        if row["system"].startswith("minisbert[int8"):  # inexact by design (dynamic and static)
            assert row["min_cosine_vs_st"] >= 0.99 and row["max_abs_diff_vs_st"] > TOL
        else:
            assert row["max_abs_diff_vs_st"] <= TOL
        assert len(row["vs_st_per_pass"]) == 2 and all(x > 0 for x in row["vs_st_per_pass"])
    assert "vs ST within each pass: minisbert[" in proc.stdout and "CPU: " in proc.stdout
    assert "minisbert[int8] vs minisbert[" in proc.stdout


@pytest.mark.slow  # one subprocess per script, each importing torch: ~40 s
@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_every_script_starts(script):
    """Each script imports what it needs (the tests' helpers included) and parses its arguments: one whose
    import broke under a refactor fails here, not when someone reruns a measurement in the docs."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]


def bench_script(monkeypatch):
    """scripts/bench.py as a module; what it sets at import (environment, sys.path) is undone after the test."""
    for name in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, os.environ.get(name, "1" if name == "HF_HUB_OFFLINE" else "false"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return load_script("bench")


@pytest.mark.parametrize("arch", ["bert", "deberta-v2"])
def test_bench_gemm_bound_times_the_fast_paths_own_gemms(arch, tiny_models, monkeypatch):
    """The GEMM bound of scripts/bench.py runs minisbert's linears at the row counts the fast path forms for
    the same texts (token batches, rounded to the backend's row multiple): recorded from a real encode."""
    bench = bench_script(monkeypatch)
    encoder = load(tiny_models, arch)
    runner_or_skip(encoder, arch)
    texts = corpus(70) + [" ".join(corpus(40)[i: i + 12]) for i in range(0, 36, 6)]  # some cut at 128 tokens
    block = encoder.runner.forward.blocks[0]
    seen, qkv = [], block.qkv

    def recording(x):
        seen.append(x.shape[0])
        return qkv(x)

    monkeypatch.setattr(block, "qkv", recording)
    encoder.encode(texts, batch_size=4)
    lengths = [len(ids) for ids in encoder.tokenizer.encode_ids(texts)]
    assert max(lengths) == 128 and len(set(lengths)) > 10
    gemms = bench.GemmsAlone(encoder, dict(zip(texts, lengths)))
    rows = gemms.rows(texts, 4)
    assert rows == seen and len(rows) > 3
    gemms.encode(texts, batch_size=4)  # and it runs the block's own linears at those rows
    assert seen == rows + rows


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fast_path_close_to_fp32(arch, dtype, tiny_models):
    """fp16/bf16 on CUDA (packed path, compiled pooling) against the fp32 reference on the CPU."""
    texts = corpus(60)
    want = load(tiny_models, arch, fast=False).encode(texts)
    ours = load(tiny_models, arch, device="cuda", dtype=dtype)
    assert ours.fast
    got = ours.encode(texts).astype(np.float32)  # float16 models give float16 arrays, as sentence-transformers
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.999, f"{arch} {dtype} on CUDA: min cosine {cos.min():.6f}"
    # The reference path on the same GPU and dtype agrees with the packed one.
    ref = load(tiny_models, arch, device="cuda", dtype=dtype, fast=False).encode(texts).astype(np.float32)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, f"{arch} {dtype} on CUDA, fast vs reference: min cosine {cos.min():.6f}"


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp32_fast_path_matches_reference(tiny_models):
    """fp32 on CUDA: the packed path is the same function as the reference (TF32 off, as torch's default)."""
    texts = corpus(60)
    want = load(tiny_models, "bert", fast=False).encode(texts)
    got = load(tiny_models, "bert", device="cuda").encode(texts)
    assert max_diff(got, want) <= TOL


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_compiled_pooling_equals_reference(dtype):
    """Both kernels through torch.compile on CUDA (the default there) against the eager reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tol = TOL if dtype == torch.float32 else 1e-2
    for B, T, C in ((4, 10, 32), (33, 128, 768), (1, 3, 8)):  # several shapes: one dynamic compile serves all
        x = torch.randn(B, T, C, device="cuda", generator=g).to(dtype)
        lengths = torch.randint(0, T + 1, (B,), device="cuda", generator=g)
        lengths[0] = T
        mask = (torch.arange(T, device="cuda")[None] < lengths[:, None]).long()
        ref = st_mean(x, mask).float()
        assert (kernels.mean_pool(x, mask).float() - ref).abs().max() <= tol
        assert (kernels.packed_mean(x[mask.bool()], lengths).float() - ref).abs().max() <= tol
    assert not kernels.compile_failures(), "torch.compile failed on CUDA (eager fallback was used)"


@pytest.mark.parametrize("backend", ["aten", "mkldnn", "int8"])
def test_linear_rows_do_not_depend_on_how_many_rows_share_the_gemm(backend):
    """A text's packed rows give bitwise the same output alone (few rows) as inside a big batch (int8 too:
    integer sums are exact and every token has its own scale)."""
    from minisbert.fast.linear import Linear

    if backend == "mkldnn" and not mkldnn_usable(torch.float32):
        pytest.skip("oneDNN linear is not available")
    if backend == "int8" and not onednn_int8_usable():
        pytest.skip("oneDNN's int8 linear is not available")
    torch.manual_seed(0)
    for n_in, n_out, act in ((768, 768, None), (3072, 768, None), (768, 3072, "gelu")):
        w, b = torch.randn(n_out, n_in), torch.randn(n_out)
        lin = Linear(w, b, backend, act=act, rotate_input=backend == "int8")
        x = torch.randn(300, n_in)
        full = lin(x)
        for n in (1, 2, 3, 5, 7, 9, 11, 12, 13, 17, 64, 129):
            assert torch.equal(lin(x[:n]), full[:n]), f"{backend} {n_in}->{n_out}: {n} rows"


@pytest.mark.parametrize("backend", ["aten", "mkldnn", "int8"])
def test_linear_add_is_the_residual_sum(backend):
    """``Linear.add`` (the residual fused into oneDNN's GEMM epilogue) is bitwise residual + linear."""
    from minisbert.fast.linear import Linear

    if backend == "mkldnn" and not mkldnn_usable(torch.float32):
        pytest.skip("oneDNN linear is not available")
    torch.manual_seed(0)
    lin = Linear(torch.randn(96, 128), torch.randn(96), backend)
    for n in (64, 70):  # a multiple of linear.ROWS (fused on oneDNN) and not
        x, residual = torch.randn(n, 128), torch.randn(n, 96)
        assert torch.equal(lin.add(x, residual), residual + lin(x)), n
