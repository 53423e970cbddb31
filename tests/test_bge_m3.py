"""bge-m3's lexical weights and ColBERT vectors (``SentenceEncoder.encode_hybrid``, ``modules/bge_m3.py``)
against FlagEmbedding's ``BGEM3FlagModel`` on tiny XLM-R folders with random ``sparse_linear.pt`` and
``colbert_linear.pt`` heads; the pure helpers by hand; the head pickles read only through the safe loader.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus

from minisbert import SentenceEncoder
from minisbert.errors import CheckpointError
from minisbert.modules.bge_m3 import colbert_score, lexical_matching_score, lexical_weights

pytest.importorskip("sentencepiece", reason="the tiny checkpoints' vocabulary is trained with sentencepiece")
pytest.importorskip("transformers")
from new_archs import add_m3_heads, make_xlmr_checkpoint  # noqa: E402  (needs sentencepiece)

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOL = 1e-5
TEXTS = corpus(30) + ["안녕하세요 안녕하세요 안녕하세요", "한국어와 English 123,456원 😀🇰🇷", "", "   ",
                      unicodedata.normalize("NFD", "자모로 풀어 쓴 한국어"), "<s> 가 </s> <mask> <unk>",
                      "한국어 문장 " * 700]


# ---------------------------------------------------------------------------------------------------
# The pure helpers, by hand


def test_lexical_weights_by_hand():
    # ids 5 and 7 twice: the larger weight stays; 0 and 2 are special; 9 weighs 0; first-carried order.
    got = lexical_weights([0.5, 0.1, 0.3, 0.0, 0.9, 0.7, 0.2], [0, 7, 5, 9, 5, 2, 7], frozenset({0, 2}))
    assert got == {"7": 0.2, "5": 0.9} and list(got) == ["7", "5"]


def test_scores_by_hand():
    assert lexical_matching_score({"1": 0.5, "2": 2.0}, {"2": 0.25, "3": 9.0}) == 0.5
    assert lexical_matching_score([{"1": 1.0}], [{"1": 2.0}, {}]).tolist() == [[2.0, 0.0]]
    with pytest.raises(ValueError, match="two dicts or two lists"):
        lexical_matching_score({"1": 1.0}, [{"1": 1.0}])
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    p = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]], dtype=np.float32)
    # query row 0: best 1.0 (p[1]); row 1: best 0.8 (p[0]); mean 0.9
    assert abs(colbert_score(q, p).item() - 0.9) < 1e-7


# ---------------------------------------------------------------------------------------------------
# Against FlagEmbedding


@pytest.fixture(scope="module")
def m3_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("m3")
    return {"bge-m3": add_m3_heads(make_xlmr_checkpoint(root / "bge-m3")),
            # sentencepiece.bpe.model only, and a ColBERT width other than the hidden size
            "spm-48": add_m3_heads(make_xlmr_checkpoint(root / "spm", spm_only=True, seed=1), colbert_dim=48,
                                   seed=1)}


@pytest.fixture(scope="module")
def flag_outputs(m3_folders) -> dict[tuple[str, int], dict]:
    """BGEM3FlagModel's dense, lexical and ColBERT outputs of TEXTS, per folder and max_length."""
    flag = pytest.importorskip("FlagEmbedding", reason="FlagEmbedding is the reference (the test extra)")
    out = {}
    for name, path in m3_folders.items():
        model = flag.BGEM3FlagModel(str(path), use_fp16=False, devices="cpu", colbert_dim=48 if "48" in name else -1)
        for max_length in (512, 2048):
            out[name, max_length] = model.encode(TEXTS, batch_size=8, max_length=max_length, return_dense=True,
                                                 return_sparse=True, return_colbert_vecs=True)
        out[name, "model"] = model
    return out


def compare(got: dict, want: dict, what: str) -> dict[str, float]:
    """Max abs differences per output; the lexical weights must have the same ids in the same order."""
    diffs = {"dense": float(np.abs(got["dense_vecs"] - want["dense_vecs"]).max())}
    lex = 0.0
    for b, (g, w) in enumerate(zip(got["lexical_weights"], want["lexical_weights"], strict=True)):
        assert list(g) == list(w), f"{what}: text {b}: ids {list(g)[:8]} vs {list(w)[:8]}"
        lex = max([lex] + [abs(g[k] - float(w[k])) for k in g])
    diffs["lexical"] = lex
    col = 0.0
    for b, (g, w) in enumerate(zip(got["colbert_vecs"], want["colbert_vecs"], strict=True)):
        assert g.shape == w.shape and g.dtype == np.float32, f"{what}: text {b}: {g.shape} vs {w.shape}"
        col = max(col, float(np.abs(g - w).max()))
    diffs["colbert"] = col
    assert max(diffs.values()) <= TOL, f"{what}: {diffs}"
    return diffs


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("name", ["bge-m3", "spm-48"])
def test_hybrid_equals_flagembedding(name, fast, m3_folders, flag_outputs):
    encoder = SentenceEncoder(m3_folders[name], fast=fast)
    assert encoder.fast is fast
    for max_length in (512, 2048):
        got = encoder.encode_hybrid(TEXTS, batch_size=8, max_length=max_length)
        diffs = compare(got, flag_outputs[name, max_length], f"{name} fast={fast} max_length={max_length}")
        print(f"\n{name} fast={fast} max_length={max_length}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert encoder.max_seq_length == 2048  # max_length does not stay
    assert got["colbert_vecs"][-1].shape == (2047, 48 if "48" in name else 64)
    # Batch size 1 gives the same outputs; the dense one is what encode gives.
    alone = encoder.encode_hybrid(TEXTS[-7:], batch_size=1, max_length=2048)
    compare(alone, {k: v[-7:] for k, v in flag_outputs[name, 2048].items()}, f"{name} fast={fast} batch 1")
    assert np.abs(got["dense_vecs"] - encoder.encode(TEXTS)).max() <= TOL


def test_scores_equal_flagembedding(m3_folders, flag_outputs):
    model, out = flag_outputs["bge-m3", "model"], flag_outputs["bge-m3", 512]
    ours = SentenceEncoder(m3_folders["bge-m3"]).encode_hybrid(TEXTS[:6] + TEXTS[-6:], max_length=512)
    lex, want = ours["lexical_weights"], out["lexical_weights"][:6] + out["lexical_weights"][-6:]
    got_scores = SentenceEncoder.compute_lexical_matching_score(lex, lex)
    want_scores = model.compute_lexical_matching_score(want, want)
    assert got_scores.shape == (12, 12) and np.abs(got_scores - want_scores).max() <= TOL
    assert (got_scores > 0).sum() > 12  # texts share tokens: a test that can fail
    assert abs(SentenceEncoder.compute_lexical_matching_score(lex[0], lex[1]) -
               model.compute_lexical_matching_score(want[0], want[1])) <= TOL
    vecs, want_vecs = ours["colbert_vecs"], out["colbert_vecs"][:6] + out["colbert_vecs"][-6:]
    for i, j in [(0, 1), (1, 0), (2, 11), (11, 3), (4, 4)]:
        got, ref = SentenceEncoder.colbert_score(vecs[i], vecs[j]), model.colbert_score(want_vecs[i], want_vecs[j])
        assert abs(got.item() - ref.item()) <= TOL, (i, j, got, ref)


# ---------------------------------------------------------------------------------------------------
# The API's edges and the safe loader


def test_one_text_and_choices(m3_folders):
    encoder = SentenceEncoder(m3_folders["bge-m3"])
    one = encoder.encode_hybrid("안녕하세요 반갑습니다")
    assert one["dense_vecs"].shape == (64,) and isinstance(one["lexical_weights"], dict)
    assert one["colbert_vecs"].ndim == 2
    dense = encoder.encode_hybrid(["가", "나"], return_sparse=False, return_colbert_vecs=False)
    assert dense["lexical_weights"] is None and dense["colbert_vecs"] is None and dense["dense_vecs"].shape == (2, 64)
    assert encoder.encode_hybrid([])["dense_vecs"].shape == (0, 64)
    with pytest.raises(ValueError, match="choose one or more"):
        encoder.encode_hybrid(["가"], return_dense=False, return_sparse=False, return_colbert_vecs=False)
    with pytest.raises(ValueError, match="max_seq_length"):
        encoder.encode_hybrid(["가"], max_length=10**6)
    assert encoder.max_seq_length == 2048


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.rglob("*"):
        if f.is_file() and f.name not in ("sparse_linear.pt", "colbert_linear.pt"):
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


class Opens:
    """A pickle that opens (creates) a file when unpickled: what a hostile head file could run instead."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_head_files_are_read_safely(m3_folders, tmp_path):
    src = m3_folders["bge-m3"]
    plain = copy_model(src, tmp_path / "plain")
    with pytest.raises(ValueError, match="no sparse_linear.pt"):
        SentenceEncoder(plain).encode_hybrid(["가"])
    assert SentenceEncoder(plain).encode_hybrid(["가"], return_sparse=False, return_colbert_vecs=False)["dense_vecs"] \
        .shape == (1, 64)
    half = copy_model(src, tmp_path / "half")
    (half / "sparse_linear.pt").write_bytes((src / "sparse_linear.pt").read_bytes())
    with pytest.raises(CheckpointError, match="colbert_linear.pt: missing"):
        SentenceEncoder(half).encode_hybrid(["가"])
    hostile = copy_model(src, tmp_path / "hostile")
    (hostile / "colbert_linear.pt").write_bytes((src / "colbert_linear.pt").read_bytes())
    marker = tmp_path / "ran"
    torch.save({"weight": torch.zeros(1, 64), "bias": Opens(marker)}, hostile / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match="sparse_linear.pt"):
        SentenceEncoder(hostile).encode_hybrid(["가"])
    assert not marker.exists()
    wrong = copy_model(src, tmp_path / "wrong")
    (wrong / "colbert_linear.pt").write_bytes((src / "colbert_linear.pt").read_bytes())
    torch.save({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, wrong / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match=r"'weight' has shape \(1, 32\)"):
        SentenceEncoder(wrong).encode_hybrid(["가"])
    assert json.loads((src / "config.json").read_text())["hidden_size"] == 64


def test_save_keeps_the_sentencepiece_model_and_the_heads(m3_folders, tmp_path):
    """A saved spm-only bge-m3 loads again with the same tokens, embeddings and hybrid outputs: the
    SentencePiece model and both head files travel with it (minisbert trains neither head)."""
    encoder = SentenceEncoder(m3_folders["spm-48"])
    saved = tmp_path / "saved"
    encoder.save(saved)
    for name in ("sentencepiece.bpe.model", "sparse_linear.pt", "colbert_linear.pt"):
        assert (saved / name).read_bytes() == (Path(m3_folders["spm-48"]) / name).read_bytes(), name
    again = SentenceEncoder(saved)
    a, b = encoder.encode_hybrid(TEXTS[:6]), again.encode_hybrid(TEXTS[:6])
    assert np.array_equal(a["dense_vecs"], b["dense_vecs"])
    assert a["lexical_weights"] == b["lexical_weights"]
    assert all(np.array_equal(x, y) for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]))
