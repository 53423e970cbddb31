"""XLM-RoBERTa (bge-m3, KURE-v1, multilingual-e5, KoE5) against transformers and sentence-transformers.

Tiny random checkpoints (``new_archs.make_xlmr_checkpoint``: 2,050 positions, a SentencePiece Unigram
vocabulary trained on Korean text) in four variants: bge-m3-like (CLS + Normalize) and e5-like (mean,
``query: `` / ``passage: `` prompts), each with ``tokenizer.json`` and with only ``sentencepiece.bpe.model``.
Token ids equal transformers' ``XLMRobertaTokenizer``; embeddings equal sentence-transformers' on the fast
and reference paths (fp32, 1e-5) up to max_seq_length (2,048 tokens); bf16 and int8 close to fp32 as for
the other architectures; traces equal transformers eager; training steps equal old_fit.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus, st_model

from minisbert import SentenceEncoder
from minisbert.errors import ConfigError
from minisbert.fast.int8 import onednn_int8_usable
from minisbert.io.folder import read_tokenizer_files
from minisbert.text.sentencepiece import read_spm_model
from minisbert.text.tokenizer import TextTokenizer

pytest.importorskip("sentencepiece", reason="the tiny checkpoints' vocabulary is trained with sentencepiece")
transformers = pytest.importorskip("transformers")
from new_archs import make_xlmr_checkpoint  # noqa: E402  (needs sentencepiece)

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOL = 1e-5
PROMPTS = {"query": "query: ", "passage": "passage: "}
VARIANTS = {  # name -> make_xlmr_checkpoint's keywords
    "bge": dict(pooling="cls", normalize=True),
    "bge-spm": dict(pooling="cls", normalize=True, spm_only=True),
    "e5": dict(pooling="mean", normalize=False, prompts=PROMPTS),
    "e5-spm": dict(pooling="mean", normalize=False, prompts=PROMPTS, spm_only=True),
}
LONG = ("한국어 문장과 English words, 숫자 1,234원 그리고 😀 이모지. " * 300)[:10_000]
# What a tokenizer meets: Korean, mixed scripts, emoji (with a flag and a ZWJ sequence), NFD jamo, empty,
# whitespace only, special tokens written in the text, compatibility characters, and 10,000 characters.
HARD = ["안녕하세요?", "한국어와 English가 섞인 문장 123,456원 (50%)", "😀🇰🇷👩‍👩‍👧 이모지만", "",
        "   ", "\t\n \u3000", unicodedata.normalize("NFD", "한국어 자모로 풀어 쓴 café"), "<s> 가 </s> <mask> 나 <pad>",
        "  앞뒤  공백과   여러 칸  ", "ﬁ ① Ａ ㈜ ½", "\u200b\u00a0x\ufeff", LONG, "가나다라마바사" * 1500]
TEXTS = corpus(40) + HARD


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xlmr")
    return {name: make_xlmr_checkpoint(root / name, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def references(folders) -> dict[str, dict[str, np.ndarray]]:
    """sentence-transformers' embeddings of TEXTS per variant (and per prompt for the e5 ones)."""
    out = {}
    for name, path in folders.items():
        st = st_model(path)
        out[name] = {None: st.encode(TEXTS, batch_size=16)}
        if "prompts" in VARIANTS[name]:
            out[name]["query"] = st.encode(TEXTS[-12:], batch_size=16, prompt_name="query")
    return out


# ---------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("name", ["bge", "bge-spm"])
def test_token_ids_equal_transformers(name, folders):
    """Ids, truncated at 2,048 and at 8 tokens, equal transformers' XLMRobertaTokenizer for the folder
    (which converts sentencepiece.bpe.model when there is no tokenizer.json)."""
    ref = transformers.XLMRobertaTokenizer.from_pretrained(str(folders[name]))
    ours = SentenceEncoder(folders[name]).tokenizer
    assert ours.pad_id == ref.pad_token_id == 1 and ours.unk_id == ref.unk_token_id == 3
    assert ours.special_ids == frozenset(ref.all_special_ids)
    assert ours.max_seq_length == 2048
    texts = HARD + TEXTS[:40]
    for length in (2048, 8):
        ours.max_seq_length = length
        want = ref(texts, truncation=True, max_length=length)["input_ids"]
        got = ours.encode_ids(texts)
        bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert not bad, f"{name} at {length}: text {bad[0]} {texts[bad[0]][:40]!r}: {got[bad[0]][:20]} " \
                        f"vs {want[bad[0]][:20]}"
    assert len(want[HARD.index(LONG)]) == 8 and max(len(r) for r in got) == 8
    assert [len(r) for r in got[3:6]] == [2, 2, 2]  # empty and whitespace-only texts: <s> </s>


def test_sentencepiece_conversion_is_transformers(folders, tmp_path):
    """The Unigram built from sentencepiece.bpe.model is transformers' conversion, field for field:
    vocabulary with scores and fairseq ids, precompiled normaliser, pre-tokenizer, template, added tokens
    (also with an AddedToken ``<mask>`` that strips the spaces before it, as XLM-R's own config has)."""
    lstrip = tmp_path / "lstrip"
    lstrip.mkdir()
    config = json.loads((folders["bge-spm"] / "tokenizer_config.json").read_text())
    config["mask_token"] = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": True,
                            "single_word": False, "special": True, "__type": "AddedToken"}
    (lstrip / "tokenizer_config.json").write_text(json.dumps(config))
    (lstrip / "sentencepiece.bpe.model").write_bytes((folders["bge-spm"] / "sentencepiece.bpe.model").read_bytes())
    for folder in (folders["bge-spm"], lstrip):
        ref = transformers.XLMRobertaTokenizer.from_pretrained(str(folder))
        files = read_tokenizer_files(folder)
        assert files.tokenizer_json is None and files.sentencepiece.name == "sentencepiece.bpe.model"
        ours = TextTokenizer.from_files(files, False, fallback_pad_id=1).tokenizer
        want, got = json.loads(ref._tokenizer.to_str()), json.loads(ours.to_str())
        assert got == want, [k for k in want if got.get(k) != want[k]]
    assert got["added_tokens"][-1]["lstrip"] is True
    # And the model file read by hand is what SentencePiece itself reads.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(files.sentencepiece))
    pieces, charsmap = read_spm_model(files.sentencepiece.read_bytes())
    assert len(pieces) == sp.get_piece_size() and charsmap
    assert [p for p, _, _ in pieces] == [sp.id_to_piece(i) for i in range(len(pieces))]
    assert [s for _, s, _ in pieces] == [sp.get_score(i) for i in range(len(pieces))]


def test_sentencepiece_folder_needs_no_sentencepiece_package(folders):
    """The model file is read by hand: with neither sentencepiece nor protobuf importable, the ids are the same."""
    import subprocess
    import sys

    code = ("import sys, json; sys.modules['sentencepiece'] = sys.modules['google.protobuf'] = None\n"
            "from minisbert import SentenceEncoder\n"
            f"print(json.dumps(SentenceEncoder({str(folders['bge-spm'])!r}).tokenizer.encode_ids({HARD[:9]!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == SentenceEncoder(folders["bge-spm"]).tokenizer.encode_ids(HARD[:9])


def test_sentencepiece_folder_errors(folders, tmp_path):
    src = folders["bge-spm"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sentencepiece.bpe.model").write_bytes(b"\x0a\xff\xff")  # a piece longer than the file
    with pytest.raises(ConfigError, match="sentencepiece.bpe.model: unreadable SentencePiece model"):
        TextTokenizer.from_files(read_tokenizer_files(bad), False, 1)
    other = tmp_path / "camembert"
    other.mkdir()
    (other / "sentencepiece.bpe.model").write_bytes((src / "sentencepiece.bpe.model").read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CamembertTokenizer"}))
    with pytest.raises(ConfigError, match="tokenizer_class='CamembertTokenizer'"):
        read_tokenizer_files(other)


# ---------------------------------------------------------------------------------------------------
# Embeddings against sentence-transformers


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_sentence_transformers(name, fast, folders, references):
    """Mixed-length batches and batch size 1, texts cut at max_seq_length (2,048 tokens), prompts."""
    encoder = SentenceEncoder(folders[name], fast=fast)
    assert encoder.fast is fast and encoder.max_seq_length == 2048
    want = references[name][None]
    got = encoder.encode(TEXTS, batch_size=16)
    print(f"\n{name} fast={fast}: max abs diff to sentence-transformers {max_diff(got, want):.2e}")
    assert max_diff(got, want) <= TOL, f"{name} fast={fast}: max {max_diff(got, want):.3e}"
    alone = encoder.encode(TEXTS[-8:], batch_size=1)
    assert max_diff(alone, want[-8:]) <= TOL, f"{name} fast={fast} batch 1: max {max_diff(alone, want[-8:]):.3e}"
    if "query" in references[name]:
        got, ref = encoder.encode(TEXTS[-12:], batch_size=16, prompt_name="query"), references[name]["query"]
        assert max_diff(got, ref) <= TOL, f"{name} fast={fast} prompt: max {max_diff(got, ref):.3e}"
        assert max_diff(got, want[-12:]) > 1e-3  # the prompt changes the embedding
    # The long texts really fill max_seq_length.
    assert {len(i) for i in encoder.tokenizer.encode_ids(HARD[-2:])} == {2048}


@pytest.mark.parametrize("name", ["bge", "e5"])
def test_bf16_close_to_fp32(name, folders, references):
    """bf16 on the fast path within cosine 0.999 of fp32, and of the bf16 reference path (as on CUDA)."""
    texts = TEXTS[:24] + HARD[-2:]
    want = references[name][None][: 24]
    fast = SentenceEncoder(folders[name], dtype=torch.bfloat16)
    assert fast.fast
    got = fast.encode(texts, batch_size=16).astype(np.float32)
    assert cosines(got[:24], want).min() >= 0.999, f"{name} bf16: min cosine {cosines(got[:24], want).min():.6f}"
    ref = SentenceEncoder(folders[name], dtype=torch.bfloat16, fast=False).encode(texts, batch_size=16)
    cos = cosines(got, ref.astype(np.float32))
    assert cos.min() >= 0.999, f"{name} bf16 fast vs reference: min cosine {cos.min():.6f}"


@pytest.mark.skipif(not onednn_int8_usable(), reason="oneDNN's int8 linear does not run here")
@pytest.mark.parametrize("name", ["bge", "e5"])
def test_int8_close_to_fp32(name, folders, references):
    quantized = SentenceEncoder(folders[name], quantize="int8")
    assert quantized.runner.forward.backend == "int8"
    want = references[name][None]
    got = quantized.encode(TEXTS, batch_size=16)
    assert cosines(got, want).min() >= 0.99, f"{name} int8: min cosine to fp32 {cosines(got, want).min():.5f}"
    assert max_diff(got, want) > 1e-4  # really quantized
    assert max_diff(quantized.encode(TEXTS[:8], batch_size=1), got[:8]) <= TOL  # per-token scales


# ---------------------------------------------------------------------------------------------------
# Looking inside, and training


def test_trace_equals_transformers_eager(folders):
    path = folders["bge-spm"]
    encoder = SentenceEncoder(path)
    encoder.max_seq_length = 300  # attention maps are (L, H, T, T) per text
    texts = TEXTS[:8] + HARD[:8] + [LONG]
    traces = encoder.trace(texts, batch_size=4)
    input_ids, mask = encoder.tokenizer(texts)
    hf = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    h_max = a_max = 0.0
    for b, tr in enumerate(traces):
        T = int(mask[b].sum())
        assert tr.input_ids.tolist() == input_ids[b, :T].tolist() and tr.tokens[0] == "<s>" and tr.tokens[-1] == "</s>"
        h_max = max(h_max, (tr.hidden_states - torch.stack([h[b, :T] for h in out.hidden_states])).abs().max().item())
        a_max = max(a_max, (tr.attentions - torch.stack([a[b, :, :T, :T] for a in out.attentions])).abs().max().item())
    assert T == 300
    print(f"\nxlm-roberta trace: hidden states max {h_max:.2e}, attentions max {a_max:.2e}")
    assert h_max <= TOL and a_max <= TOL, (h_max, a_max)


@pytest.fixture(scope="module")
def train_checkpoints(tmp_path_factory) -> dict[str, Path]:
    import test_train

    root = tmp_path_factory.mktemp("xlmr-train")
    return {"xlm-roberta": make_xlmr_checkpoint(root / "bge", max_seq_length=128, config=test_train.NO_DROPOUT)}


@pytest.fixture(scope="module")
def train_files(tmp_path_factory) -> dict[str, Path]:
    import test_train

    return test_train.write_files(tmp_path_factory.mktemp("xlmr-data"))


def test_first_step_loss_and_gradients(train_checkpoints, train_files):
    """tests/test_train.py's check, on XLM-R: the first batch's loss and every gradient against
    sentence-transformers' loss class."""
    import test_train

    test_train.test_first_step_loss_and_gradients(train_checkpoints, train_files, "xlm-roberta", test_train.MNR)


def test_steps_equal_old_fit(train_checkpoints, train_files):
    """tests/test_train.py's 16 steps against old_fit, on XLM-R (~1 s)."""
    import test_train

    test_train.test_steps_equal_old_fit(train_checkpoints, train_files, "xlm-roberta", [test_train.MNR])
