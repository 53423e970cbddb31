"""Static int8 (``FastEncoder.observe`` / ``use_ranges``): each linear's input range calibrated once, a
fixed uint8 scale per input, bias / GELU / residual in oneDNN's epilogue. The linear against its own
definition, the calibration against the inputs it saw, the embeddings against fp32 (inexact by design),
the ranges file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint
from test_quantize import cosines

from minisbert import SentenceEncoder
from minisbert.fast import int8
from minisbert.fast.int8 import STATIC_LINEARS, RangeObserver, affine, keeps_static, load_ranges, quantize_rows
from minisbert.fast.linear import ROWS, Linear
from minisbert.fast.runner import fast_forward

pytestmark = pytest.mark.skipif(not int8.onednn_int8_usable(), reason="oneDNN's int8 linear does not run here")
ARCHS = ["bert", "roberta", "deberta-v2"]
TOL = 1e-5


def test_affine_holds_zero_exactly():
    scale, zero = affine(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == round(1 / scale)
    assert affine(0.5, 2.0) == (pytest.approx(2 / 255), 0)  # widened to hold 0
    assert affine(-2.0, -1.0) == (pytest.approx(2 / 255), 255)


def definition(x, w, b, low, high, act=None):
    """Static int8 by hand in float64: x quantized with the one uint8 scale, w per output channel; then
    the bias and the activation."""
    scale, zero = affine(low, high)
    qx = (x.double() / scale).round().add(zero).clamp(0, 255)
    qw, sw = quantize_rows(w)
    y = ((qx - zero) * scale) @ (qw.double() * sw.double()).T + b.double()
    return torch.nn.functional.gelu(y) if act else y


@pytest.mark.parametrize("act", [None, "gelu"])
def test_static_linear_is_its_definition(act):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(70, 128, generator=g)  # 70 rows: not a multiple of linear.ROWS
    low, high = float(x.min()), float(x.max())
    lin = Linear(w, b, "int8", act=act, input_range=(low, high))
    want = definition(x, w, b, low, high, act)
    assert lin.backend == "int8-static"
    got = lin(x)
    assert got.shape == (70, 96) and got.dtype == torch.float32
    # float32 epilogue vs float64; a rounding tie of x / scale may land on the other side in float32.
    assert (got.double() - want).abs().max() <= 1e-3 * want.abs().max()
    exact = x @ w.T + b
    exact = torch.nn.functional.gelu(exact) if act else exact
    assert (got - exact).abs().max() <= 0.05 * exact.abs().max()
    assert (got - exact).abs().max() > 1e-5  # really quantized
    # The residual in the epilogue: the same as adding it after.
    residual = torch.randn(64, 96, generator=g)
    if act is None:
        fused = lin.add(x[:64], residual)
        assert torch.allclose(fused, lin(x[:64]) + residual, atol=1e-5)
        # ... and accumulated in place into a view of a larger tensor, the rest untouched
        big = torch.randn(128, 96, generator=g)
        into = big.clone()
        assert lin.add_(x[:64], into[32:96]).data_ptr() == into[32:96].data_ptr()
        assert torch.allclose(into[32:96], fused - residual + big[32:96], atol=1e-5)
        assert torch.equal(into[:32], big[:32]) and torch.equal(into[96:], big[96:])
    # Outside the calibrated range the input saturates, as any static scale does.
    assert torch.equal(lin(x * 0 + 10 * high)[:1], lin(x * 0 + 20 * high)[:1])


def test_static_linear_writes_the_next_ones_uint8_input():
    """``output_range``: the GELU output quantized by the GEMM itself; the next linear takes it as it is."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(256, 64, generator=g) * 0.1, torch.randn(256, generator=g) * 0.1
    w2, b2 = torch.randn(64, 256, generator=g) * 0.05, torch.randn(64, generator=g)
    x = torch.randn(ROWS * 2, 64, generator=g)
    hidden = torch.nn.functional.gelu(x @ w.T + b)
    out_range = (float(hidden.min()), float(hidden.max()))
    up = Linear(w, b, "int8", act="gelu", input_range=(float(x.min()), float(x.max())), output_range=out_range)
    down = Linear(w2, b2, "int8", input_range=out_range)
    q = up(x)
    assert q.dtype == torch.uint8 and q.shape == (ROWS * 2, 256)
    scale, zero = affine(*out_range)
    float_up = Linear(w, b, "int8", act="gelu", input_range=(float(x.min()), float(x.max())))
    want = (float_up(x) / scale).round() + zero
    assert (q.double() - want.clamp(0, 255)).abs().max() <= 1  # the same value up to one rounding step
    assert torch.allclose(down(q), down((q.float() - zero) * scale), atol=1e-4)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, max_seq_length=128) for arch in ARCHS}


def calibrated(path, texts, ratio=None):
    exact = SentenceEncoder.from_pretrained(path)
    with exact.runner.forward.observe(ratio) as ranges:
        exact.encode(texts)
    static = SentenceEncoder.from_pretrained(path, quantize="int8")
    static.runner.forward.use_ranges(ranges)
    return exact, static, ranges


def test_observe_records_each_linears_inputs(tiny_models):
    """Block 0's q/k/v input is the embeddings' output: its (min, max) over the texts' tokens. With ratio
    0 nothing passes the static test, with inf everything does."""
    path = tiny_models["bert"]
    texts = corpus(20, seed=3)
    exact = SentenceEncoder.from_pretrained(path)
    with exact.runner.forward.observe(ratio=float("inf")) as ranges:
        exact.encode(texts)
    assert len(ranges) == len(exact.model.blocks) and all(set(r) == set(STATIC_LINEARS) for r in ranges)
    model = exact.model
    states = []
    with torch.inference_mode():
        for ids in exact.tokenizer.encode_ids(texts):
            ids = torch.tensor([ids[: exact.max_seq_length]])
            states.append(model.embed(ids[0], model.position_ids(ids)[0]))
    states = torch.cat(states)
    assert ranges[0]["qkv"] == pytest.approx([float(states.min()), float(states.max())], abs=TOL)
    # observing leaves the forward unobserved afterwards
    assert all(getattr(b, name).observe is None for b in exact.runner.forward.blocks for name in STATIC_LINEARS)
    with exact.runner.forward.observe(ratio=0) as none:
        exact.encode(texts)
    assert none == [{} for _ in ranges]
    dynamic = SentenceEncoder.from_pretrained(path, quantize="int8")
    mixed = SentenceEncoder.from_pretrained(path, quantize="int8")
    mixed.runner.forward.use_ranges([{k: v for k, v in r.items() if k != "down"} for r in ranges])
    blocks = mixed.runner.forward.blocks
    assert [blocks[0].up.backend, blocks[0].down.backend] == ["int8-static", "int8"]  # down stays dynamic
    mixed.runner.forward.use_ranges(none)  # nothing static: the dynamic mode's own embeddings
    assert np.abs(mixed.encode(texts) - dynamic.encode(texts)).max() <= TOL


def test_quantization_errors_pick_dynamic_for_outliers():
    """One outlier channel stretches the static scale for every token: its error far above the
    per-token dynamic one's, so ``keeps_static`` refuses it; without the outlier it keeps it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 256, generator=g)
    observer = RangeObserver()
    observer(x)
    assert keeps_static(observer)
    x[::50, 3] = 60.0
    spiky = RangeObserver()
    spiky(x)
    static, dynamic = int8.quantization_errors(torch.cat(spiky.rows), spiky.low, spiky.high)
    assert static > int8.STATIC_ERROR_RATIO * dynamic and not keeps_static(spiky)


@pytest.mark.parametrize("arch", ARCHS)
def test_static_int8_close_to_fp32(arch, tiny_models, tmp_path):
    exact, static, ranges = calibrated(tiny_models[arch], corpus(60, seed=1), ratio=float("inf"))
    assert {getattr(b, n).backend for b in static.runner.forward.blocks for n in STATIC_LINEARS} == {"int8-static"}
    texts = corpus(60) + ["", "한국어 " * 300]
    want, got = exact.encode(texts), static.encode(texts)
    cos = cosines(got, want)
    assert cos.min() >= 0.99, f"{arch} static int8: min cosine to fp32 {cos.min():.5f}"
    assert np.abs(got - want).max() > 1e-4
    # Fixed scales: a text's embedding does not depend on the other texts in its batch.
    alone = static.encode(texts[:8], batch_size=1)
    assert np.abs(alone - got[:8]).max() <= TOL
    # Saved and loaded, the ranges give the same encoder.
    int8.save_ranges(ranges, tmp_path / "ranges.json")
    again = SentenceEncoder.from_pretrained(tiny_models[arch], quantize="int8")
    again.runner.forward.use_ranges(load_ranges(tmp_path / "ranges.json"))
    assert np.abs(again.encode(texts) - got).max() <= TOL


def test_ranges_refused_where_they_do_not_fit(tiny_models, tmp_path):
    _, _, ranges = calibrated(tiny_models["bert"], corpus(10))
    with pytest.raises(ValueError, match="quantize='int8'"):
        fast_forward(SentenceEncoder.from_pretrained(tiny_models["bert"]).model, ranges=ranges)
    with pytest.raises(ValueError, match="one entry per block"):
        SentenceEncoder.from_pretrained(tiny_models["bert"], quantize="int8").runner.forward.use_ranges(ranges[:1])
    (tmp_path / "x.json").write_text('{"blocks": []}')
    with pytest.raises(ValueError, match="not a minisbert int8 ranges file"):
        load_ranges(tmp_path / "x.json")


def test_cli_quantize_calibrate_then_encode(tiny_models, tmp_path, capsys):
    """``minisbert quantize --calibrate FILE --output RANGES`` then ``encode --quantize int8 --int8-ranges
    RANGES``: the Python API's static encoder, through files."""
    import json

    from minisbert import cli

    path = tiny_models["bert"]
    calibration = corpus(40, seed=5)
    (tmp_path / "calib.txt").write_text("\n".join(calibration) + "\n", encoding="utf-8")
    assert cli.main(["quantize", "--model", str(path), "--calibrate", str(tmp_path / "calib.txt"),
                     "--output", str(tmp_path / "ranges.json")]) == 0
    assert "linear layers static" in capsys.readouterr().err
    _, static, ranges = calibrated(path, calibration)
    assert load_ranges(tmp_path / "ranges.json") == ranges
    texts = corpus(6, seed=6)
    assert cli.main(["encode", "--model", str(path), "--quantize", "int8", "--int8-ranges",
                     str(tmp_path / "ranges.json"), *texts]) == 0
    got = np.array([json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()])
    np.testing.assert_allclose(got, static.encode(texts), atol=1e-6)
    assert cli.main(["encode", "--model", str(path), "--int8-ranges", str(tmp_path / "ranges.json"), "x"]) == 2
    assert "--quantize int8" in capsys.readouterr().err


def test_minilm_static_int8_cosine_to_fp32(minilm_path):
    """The real all-MiniLM-L6-v2, calibrated on other texts: the linears whose inputs hold outlier
    channels stay dynamic, the rest static; every embedding within cosine 0.99 of fp32."""
    exact, static, ranges = calibrated(minilm_path, corpus(200, seed=7))
    kept = sum(len(r) for r in ranges)
    assert 0 < kept < 4 * len(ranges), ranges  # some static, some not: its outliers are real
    texts = corpus(300)
    cos = cosines(static.encode(texts), exact.encode(texts))
    assert cos.min() >= 0.99, f"min cosine {cos.min():.5f}"


@pytest.mark.slow  # 2 x 2 x 1379 KorSTS sentences
def test_minilm_static_int8_korsts_spearman_within_0_3(minilm_path):
    from conftest import require_shared_data, shared_data

    from minisbert.sts import evaluate_sts, read_sts

    data = read_sts(require_shared_data("korsts/sts-test.tsv"))
    calibration = corpus(300, seed=7)
    dev = shared_data("korsts/sts-dev.tsv")
    if dev is not None:  # the same kind of text, held out from the test pairs
        calibration = read_sts(dev).sentences1[:300]
    exact, static, _ = calibrated(minilm_path, calibration)
    spearman = [100 * evaluate_sts(e, data.sentences1, data.sentences2, data.scores)["cosine_spearman"]
                for e in (exact, static)]
    assert abs(spearman[1] - spearman[0]) <= 0.3, spearman
