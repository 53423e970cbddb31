"""int8 mode (``quantize="int8"``): the int8 linear against its own definition, the embeddings against
fp32 (inexact by design: cosine >= 0.99), off unless asked for, refused where it cannot run."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, require_shared_data, st_model
from test_fast import packed_embed

from minisbert import SentenceEncoder, cli
from minisbert.fast.int8 import hadamard, onednn_int8_usable, quantize_rows, rotate
from minisbert.fast.linear import Linear, mkldnn_usable
from minisbert.quantize import quantize_embeddings

ARCHS = ["bert", "roberta", "deberta-v2"]
TOL = 1e-5


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


needs_int8 = pytest.mark.skipif(not onednn_int8_usable(), reason="oneDNN's int8 linear does not run here")


# ---------------------------------------------------------------------------------------------------
# The pieces, by hand


def test_quantize_rows_hand_sized():
    x = torch.tensor([[127.0, -3.5, 2.5, 0.4],  # max 127: scale 1, q = round(x), ties to even
                      [254.0, -3.0, 1.0, 0.0],  # max 254: scale 2
                      [0.0, 0.0, 0.0, 0.0]])  # all zero: q = 0 with a finite scale
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q.tolist() == [[127, -4, 2, 0], [127, -2, 0, 0], [0, 0, 0, 0]]
    assert s[:2, 0].tolist() == [1.0, 2.0] and 0 < s[2, 0] < 1e-30


def test_hadamard_is_orthonormal_and_rotates_blocks():
    h = hadamard(4)
    assert torch.equal(h * 2, torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]))
    assert torch.allclose(h @ h.T, torch.eye(4), atol=1e-7)
    x = torch.arange(16.0).view(2, 8)
    assert torch.allclose(rotate(x, h), x @ torch.block_diag(h, h))
    # One outlier spreads over its block: max |x| / RMS falls from sqrt(64) = 8 to 1.
    spike = torch.zeros(1, 64)
    spike[0, 5] = 8.0
    turned = rotate(spike, hadamard(64))
    assert torch.allclose(turned.abs(), torch.ones(1, 64))


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("rotate_input, act, packed", [(False, None, True), (True, None, True), (True, "gelu", True),
                                                        (True, None, False)])
def test_int8_linear_is_its_definition(onednn, rotate_input, act, packed):
    """y = (q_x s_x)(q_w s_w)^T + b: the integer products exact, one scale per token and per output
    channel, the block rotation applied to both sides; through oneDNN and through torch._int_mm, the
    rotation through oneDNN's prepacked GEMM and through ``x @ h``."""
    if onednn and not onednn_int8_usable():
        pytest.skip("oneDNN's int8 linear does not run here")
    if packed and not mkldnn_usable():
        pytest.skip("oneDNN's fp32 linear does not run here")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(70, 128, generator=g)  # 70 rows: not a multiple of linear.ROWS
    lin = Linear(w, b, "int8", act=act, rotate_input=rotate_input, onednn=onednn, packed_rotation=packed)
    assert lin.onednn == onednn and (lin.rotation_packed is not None) == (packed and rotate_input)
    h = hadamard(64)
    turn = (lambda t: rotate(t, h)) if rotate_input else (lambda t: t)
    qx, sx = quantize_rows(turn(x))
    qw, sw = quantize_rows(turn(w))
    want = (qx.double() @ qw.double().T) * sx.double() * sw.double().T + b.double()
    if act:
        want = torch.nn.functional.gelu(want)
    got = lin(x)
    assert got.shape == (70, 96)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # And close to the float linear it stands for (8-bit rounding of both sides).
    exact = x @ w.T + b
    exact = torch.nn.functional.gelu(exact) if act else exact
    assert (got - exact).abs().max() <= 0.03 * exact.abs().max()


# ---------------------------------------------------------------------------------------------------
# Encoders


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, max_seq_length=128) for arch in ARCHS}


@needs_int8
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_close_to_fp32_and_off_by_default(arch, tiny_models):
    exact = SentenceEncoder.from_pretrained(tiny_models[arch])
    assert exact.quantize is None and exact.runner.forward.backend != "int8"  # off unless asked for
    quantized = SentenceEncoder.from_pretrained(tiny_models[arch], quantize="int8")
    assert quantized.quantize == "int8" and quantized.runner.forward.backend == "int8"
    texts = corpus(60) + ["", "한국어 " * 300]
    want, got = exact.encode(texts), quantized.encode(texts)
    cos = cosines(got, want)
    assert cos.min() >= 0.99, f"{arch} int8: min cosine to fp32 {cos.min():.5f}"
    assert np.abs(got - want).max() > 1e-4  # really quantized, not the fp32 path
    # Per-token scales: a text's embedding does not depend on the other texts in its batch.
    alone = quantized.encode(texts[:8], batch_size=1)
    assert np.abs(alone - got[:8]).max() <= TOL


@needs_int8
def test_minilm_int8_cosine_to_fp32(minilm_path):
    """The real all-MiniLM-L6-v2: every embedding within cosine 0.99 of fp32, and the rotation is what
    gets it there (its LayerNorm outputs hold outlier channels)."""
    texts = corpus(300)
    want = SentenceEncoder.from_pretrained(minilm_path).encode(texts)
    rotated = cosines(SentenceEncoder.from_pretrained(minilm_path, quantize="int8").encode(texts), want)
    assert rotated.min() >= 0.99, f"min cosine {rotated.min():.5f}"
    # Blocks of one column: no rotation (the pooled vectors before Normalize: the same cosines).
    plain = cosines(packed_embed(SentenceEncoder.from_pretrained(minilm_path), texts, quantize="int8",
                                 rotation_block=1), want)
    assert 1 - rotated.min() < (1 - plain.min()) / 2, (rotated.min(), plain.min())


@needs_int8
@pytest.mark.slow  # 2 x 2 x 1379 KorSTS sentences
def test_minilm_int8_korsts_spearman_within_half_a_point(minilm_path):
    path = require_shared_data("korsts/sts-test.tsv")
    from minisbert.sts import evaluate_sts, read_sts

    data = read_sts(path)
    spearman = {}
    for quantize in (None, "int8"):
        encoder = SentenceEncoder.from_pretrained(minilm_path, quantize=quantize)
        spearman[quantize] = 100 * evaluate_sts(encoder, data.sentences1, data.sentences2, data.scores)[
            "cosine_spearman"]
    assert abs(spearman["int8"] - spearman[None]) <= 0.5, spearman


def test_int8_refused_where_it_cannot_run(tiny_models):
    path = tiny_models["bert"]
    with pytest.raises(ValueError, match="not one of"):
        SentenceEncoder.from_pretrained(path, quantize="int4")
    with pytest.raises(ValueError, match="float32"):
        SentenceEncoder.from_pretrained(path, quantize="int8", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fast=False"):
        SentenceEncoder.from_pretrained(path, quantize="int8", fast=False)


@needs_int8
def test_int8_encoder_stays_int8(tiny_models, monkeypatch, caplog):
    """MINISBERT_FAST=0 does not silently drop an explicit quantize; turning the fast path off is refused;
    hooks run the fp32 reference path, with one warning that says so."""
    path = tiny_models["bert"]
    monkeypatch.setenv("MINISBERT_FAST", "0")
    encoder = SentenceEncoder.from_pretrained(path, quantize="int8")
    assert encoder.fast and encoder.runner.forward.backend == "int8"
    with pytest.raises(ValueError, match="fast=False"):
        encoder.fast = False
    texts = corpus(20)
    reference = SentenceEncoder.from_pretrained(path, fast=False).encode(texts)
    handle = encoder.model.blocks[0].register_forward_hook(lambda *args: None)
    with caplog.at_level(logging.WARNING, logger="minisbert"):
        hooked = encoder.encode(texts, batch_size=4)
    handle.remove()
    assert np.abs(hooked - reference).max() <= TOL
    assert sum("reference path" in r.message for r in caplog.records) == 1


@needs_int8
def test_cli_quantize_flag(capsys, tiny_bert):
    texts = ["첫 문장", "두 번째 문장입니다", "third"]
    outputs = {}
    for flags in ([], ["--quantize", "int8"]):
        assert cli.main(["encode", "--model", str(tiny_bert), *flags, *texts]) == 0
        lines = capsys.readouterr().out.splitlines()
        outputs[bool(flags)] = np.array([json.loads(line)["embedding"] for line in lines])
    want = SentenceEncoder.from_pretrained(tiny_bert).encode(texts)
    np.testing.assert_allclose(outputs[False], want, atol=1e-6)  # default: exact
    assert np.abs(outputs[True] - want).max() > 1e-4 and cosines(outputs[True], want).min() >= 0.99


def test_cli_quantize_checked_before_loading(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(SentenceEncoder, "from_pretrained", refuse)
    code = cli.main(["encode", "--model", "all-MiniLM-L6-v2", "--quantize", "int8", "--dtype", "bfloat16", "x"])
    assert code == 2 and "float32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["encode", "--model", "all-MiniLM-L6-v2", "--quantize", "int4", "x"])


# ---------------------------------------------------------------------------------------------------
# Quantized embeddings (precision=), byte for byte as sentence-transformers


def test_range_edges_quantize_as_sentence_transformers():
    """At a dimension's maximum, (max - min) / step is 255 only up to float32 rounding: here 255.00002
    (clipped to 255, never wrapped to 0) and 254.99998 (floored to 254), as sentence-transformers does."""
    from sentence_transformers.util import quantize_embeddings as st_quantize

    tokens = [np.array([[0.1257302165031433, 0.10490011423826218], [0.8591880202293396, 0.281821072101593]],
                       dtype=np.float32), np.array([[0.5, 0.2]], dtype=np.float32)]
    for precision, top in (("uint8", [255, 254]), ("int8", [127, 126])):
        got, want = quantize_embeddings(tokens, precision), st_quantize(tokens, precision)
        assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want)), precision
        assert got[0][1].tolist() == top, precision
        assert np.array_equal(quantize_embeddings(np.concatenate(tokens), precision), st_quantize(np.concatenate(
            tokens), precision)), precision


@pytest.mark.parametrize("precision", ["uint8", "int8"])
@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_token_embeddings_quantized_as_sentence_transformers(model, precision, tiny_models, request):
    """``encode_query(output_value="token_embeddings", precision=..., truncate_dim=...)``: the same bytes
    as sentence-transformers (ranges shared by all the call's tokens; truncate_dim cuts only sentence
    embeddings, in both)."""
    path = tiny_models["bert"] if model == "tiny" else request.getfixturevalue("minilm_path")
    ours, st = SentenceEncoder.from_pretrained(path), st_model(path)
    texts = corpus(50, seed=4) + ["", "a"]
    for truncate_dim in (None, 16):
        kwargs = dict(output_value="token_embeddings", precision=precision, truncate_dim=truncate_dim)
        got, want = ours.encode_query(texts, **kwargs), st.encode_query(texts, **kwargs)
        assert type(got) is type(want) and len(got) == len(want) == len(texts)
        for i, (a, b) in enumerate(zip(got, want)):
            assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, (truncate_dim, i)
            diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert not diff.any(), f"truncate_dim={truncate_dim} text {i}: {int((diff > 0).sum())} bytes differ, " \
                                   f"by up to {diff.max()}"
