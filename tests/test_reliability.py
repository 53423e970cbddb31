"""Reliability and security: hostile text, damaged or hostile checkpoints, safe loading, batch
invariance and bounded memory. Each error must be a minisbert error naming the file and the problem;
nothing is ever randomly initialised; no checkpoint runs code."""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, corpus, make_checkpoint, single_thread, st_model

from minisbert import CheckpointError, ConfigError, ModelNotFoundError, SentenceEncoder, UnsupportedModuleError
from minisbert import runner as runner_module
from minisbert.encoding import inference as inference_module
from minisbert.errors import MinisbertError
from minisbert.models import ARCHITECTURES
from minisbert.text.long_texts import words_tokenized_alone
from minisbert.text.tokenizer import clean_text, pad_ids

# DeBERTa-v2 joins every architecture-parametrized test once it is registered.
ARCHS = ["bert", "roberta", pytest.param("deberta-v2", marks=pytest.mark.skipif(
    "deberta-v2" not in ARCHITECTURES, reason="deberta-v2 is not registered in minisbert.models"))]


@pytest.fixture(autouse=True)
def one_thread():
    # On a loaded 2-core machine OpenMP's barrier costs ~0.4 s per forward; these tests time and
    # repeat many small forwards, and the properties they test hold at any thread count.
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> a tiny random checkpoint folder (built once per module)."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_checkpoint(tmp_path_factory.mktemp(arch.replace("-", "")), arch, max_seq_length=128)
        return made[arch]
    return get


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def max_diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a - b)
    return f"max abs diff {d.max():.3e}, mean {d.mean():.3e}"


# -- bad text input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, type_name", [(None, "NoneType"), (b"bytes", "bytes"), (3.5, "float"),
                                            (["nested"], "list"), (("a", "b"), "tuple"), (True, "bool")])
def test_non_str_items_raise_type_error_naming_index_and_type(tiny, bad, type_name):
    enc = SentenceEncoder.from_pretrained(tiny("bert"))
    with pytest.raises(TypeError, match=rf"sentences\[2\] is {type_name}, expected str"):
        enc.encode(["ok", "fine", bad])


@pytest.mark.parametrize("bad", [None, b"bytes", 7, bytearray(b"x")])
def test_non_text_argument_raises_type_error(tiny, bad):
    enc = SentenceEncoder.from_pretrained(tiny("bert"))
    with pytest.raises(TypeError, match="sentences must be a str or a list of str"):
        enc.encode(bad)


HOSTILE = {
    "empty": "",
    "whitespace only": " \t\n\u3000\u00a0",
    "lone high surrogate": "a\ud800b",
    "lone low surrogate": "\udc80",
    "surrogate pair as two code points": "\ud83d\ude00 웃음",
    "control characters": "a\x00\x01\x07b\x1b[31m\x7f끝",
    "zero-width characters": "a\u200b\u200c\u200d\ufeffb\u2060한국어",
    "NFD Hangul jamo": "\u1100\u1161\u11a8\u1102\u1165 \u1112\u1161\u11ab",
    "emoji, flags, ZWJ sequences": "🙂👍🏽🇰🇷👨‍👩‍👧 🏳️‍🌈",
    "noncharacters and private use": "\uffff\ufffe\U0010ffff\ue000",
    "U+FFFD and bidi override": "\ufffd\u202eabc",
    "50 combining marks": "e" + "\u0301" * 50,
    "200k characters": "한국어 문장 임베딩 " * 20_000,
}


def test_hostile_texts_equal_sentence_transformers(minilm_path):
    """Every text gives a finite embedding equal to sentence-transformers'. Where sentence-transformers
    raises (surrogates: the Rust tokenizer refuses them), ours equals its embedding of the text with
    each surrogate replaced by U+FFFD, which is what we document."""
    ours = SentenceEncoder.from_pretrained(minilm_path)
    ref = st_model(minilm_path)
    texts = list(HOSTILE.values())
    a = ours.encode(texts, batch_size=4)
    assert np.isfinite(a).all()
    st_behaviour = {}
    for name, text, row in zip(HOSTILE, texts, a):
        try:
            b = ref.encode([text])[0]
            st_behaviour[name] = "ok"
        except TypeError:
            b = ref.encode([clean_text(text)])[0]
            st_behaviour[name] = "TypeError"
        assert np.abs(row - b).max() <= 1e-5, f"{name}: {max_diff(row, b)}"
    # The cases sentence-transformers cannot take at all: only the surrogates.
    assert {k for k, v in st_behaviour.items() if v != "ok"} <= {k for k in HOSTILE if "surrogate" in k}


@pytest.mark.parametrize("arch", ARCHS)
def test_hostile_texts_tiny_models_equal_sentence_transformers(tiny, arch):
    path = tiny(arch)
    texts = [clean_text(t) for t in HOSTILE.values()]  # sentence-transformers cannot take surrogates
    a = SentenceEncoder.from_pretrained(path).encode(list(HOSTILE.values()), batch_size=5)
    b = st_model(path).encode(texts, batch_size=5)
    assert np.isfinite(a).all() and np.abs(a - b).max() <= 1e-5, f"tiny {arch}: {max_diff(a, b)}"


def test_surrogates_reach_no_tokenizer(tmp_path):
    """KoBERT's SentencePiece raises on a surrogate (RuntimeError from pybind11); encode cleans every
    text before any tokenizer sees it."""
    pytest.importorskip("sentencepiece")
    from test_kobert import write_kobert_checkpoint

    enc = SentenceEncoder.from_pretrained(write_kobert_checkpoint(tmp_path))
    out = enc.encode(["a\ud800b", "\udc80", "a\ufffdb"])
    assert np.isfinite(out).all() and np.array_equal(out[0], out[2])


def test_surrogates_become_replacement_characters():
    assert clean_text("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert clean_text("\ud83d\ude00") == "\ufffd\ufffd"  # a pair of code points is still two surrogates
    text = "정상적인 문장 🙂"
    assert clean_text(text) is text  # no copy when there is nothing to replace


def test_long_texts_are_cut_at_a_word_boundary_and_keep_their_tokens(minilm_path):
    tok = SentenceEncoder.from_pretrained(minilm_path).tokenizer
    assert tok.cut_is_safe  # BERT normaliser + BERT pre-tokenizer + WordPiece
    bound = tok.max_seq_length * tok.cut_chars_per_token
    long = "한국어 문장 임베딩 " * 200_000  # 2M characters
    cut = tok.long_texts.prefix(long, bound)
    assert bound <= len(cut) < bound + 10 and long.startswith(cut)
    short = "짧은 문장"
    assert tok.long_texts.prefix(short, bound) is short

    def tokens(texts, cut_is_safe):
        tok.cut_is_safe = cut_is_safe
        try:
            return tok.encode_ids(texts)
        finally:
            tok.cut_is_safe = True
    # Texts the cut must not change: fills max_seq_length, and one whose cut part has too few tokens
    # (each 150-character word is one [UNK]), which must be cut again further on.
    texts = [long[:300_000], ("가" * 150 + " ") * 100 + "끝 " * 300, "hello, world! " * 3000]
    assert tokens(texts, True) == tokens(texts, False)


def test_long_text_cost_is_bounded(minilm_path):
    """A 2M-character text costs what its first few thousand characters do; so does a text with no space
    to cut at (one word, squeezed to a few hundred characters that are still one [UNK])."""
    tok = SentenceEncoder.from_pretrained(minilm_path).tokenizer

    def seconds(text: str) -> float:
        start = time.perf_counter()
        tok.encode_ids([text])
        return time.perf_counter() - start
    prose = "한국어 문장 임베딩 " * 20_000  # 200k characters
    tok.cut_is_safe = False
    whole = seconds(prose)
    tok.cut_is_safe = True
    cut_2m = seconds(prose * 10)
    assert cut_2m < whole / 2, f"2M characters, cut: {cut_2m:.3f} s; 200k characters, whole: {whole:.3f} s"
    one_word = "한국어문장" * 10_000  # 50k characters, no space: one [UNK]
    small, big = seconds(one_word), seconds(one_word * 10)
    assert big < 30 * small, f"50k: {small:.3f} s, 500k: {big:.3f} s (quadratic would be 100x)"


def test_cut_only_for_tokenizers_that_tokenize_words_alone():
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer()
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    assert words_tokenized_alone(wordpiece)
    wordpiece.add_tokens([AddedToken("two words")])  # could straddle the cut
    assert not words_tokenized_alone(wordpiece)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()  # spaces belong to the next word
    assert not words_tokenized_alone(bpe)
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    assert not words_tokenized_alone(unigram)


# -- bad checkpoints ---------------------------------------------------------------------------------
# Each case: (name, mutation of a copied folder, error type, regex the message must match).


def _edit_json(rel: str, **changes):
    def mutate(d: Path):
        data = json.loads((d / rel).read_text())
        data.update(changes)
        (d / rel).write_text(json.dumps(data))
    return mutate


def _write(rel: str, content: str | bytes):
    def mutate(d: Path):
        (d / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return mutate


def _remove(*rels: str):
    def mutate(d: Path):
        for rel in rels:
            (d / rel).unlink()
    return mutate


def _truncate(keep: int):
    def mutate(d: Path):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:keep] if keep >= 0 else data[:keep])
    return mutate


def _header(edit):
    """Rewrite the safetensors JSON header with ``edit(header)``, keeping the data bytes."""
    def mutate(d: Path):
        data = (d / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        edit(header)
        raw = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return mutate


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in sorted(header) if k != "__metadata__")]


def _tensors(edit):
    def mutate(d: Path):
        from safetensors.torch import load_file, save_file

        state = load_file(d / "model.safetensors")
        edit(state)
        save_file(state, d / "model.safetensors")
    return mutate


def _set(key_part: str, make):
    def edit(state):
        key = next(k for k in sorted(state) if key_part in k)
        state[key] = make(state[key])
    return edit


def _nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


BAD_CHECKPOINTS = [
    # weights file
    ("empty weights file", _truncate(0), CheckpointError, r"model\.safetensors: truncated safetensors file"),
    ("truncated inside the header", _truncate(100), CheckpointError, r"model\.safetensors: safetensors header claims"),
    ("truncated data", _truncate(-1), CheckpointError,
     r"model\.safetensors: tensor .* claims bytes .*\(truncated or corrupted"),
    ("header length 2**63", lambda d: (d / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**63) + (d / "model.safetensors").read_bytes()[8:]),
     CheckpointError, r"model\.safetensors: safetensors header claims 9223372036854775808 bytes"),
    ("header not JSON", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:8] + b"\xff" * 40 + (d / "model.safetensors").read_bytes()[48:]),
     CheckpointError, r"model\.safetensors: corrupted safetensors header"),
    ("absurd shape in header", _header(lambda h: _first_tensor(h).update(shape=[2**40, 2**40])),
     CheckpointError, r"model\.safetensors: tensor .* shape \[1099511627776, 1099511627776\] need"),
    ("negative data offset", _header(lambda h: _first_tensor(h).update(data_offsets=[-8, 0])),
     CheckpointError, r"model\.safetensors: tensor .* claims bytes \[-8, 0\)"),
    ("unknown dtype in header", _header(lambda h: _first_tensor(h).update(dtype="Q7")),
     CheckpointError, r"model\.safetensors: tensor .* malformed header entry \('Q7'\)"),
    ("bool tensor", _tensors(_set("LayerNorm.weight", lambda t: t.bool())),
     CheckpointError, r"model\.safetensors: tensor '.*LayerNorm\.weight' has dtype torch\.bool"),
    ("NaN weight", _tensors(_set("LayerNorm.weight", _nan)),
     CheckpointError, r"model\.safetensors: tensor '.*LayerNorm\.weight' holds NaN or infinite values"),
    ("no weights file", _remove("model.safetensors"), CheckpointError, r"no weights file found"),
    ("broken shard index", lambda d: ((d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors"),
                                      (d / "model.safetensors.index.json").write_text("{bad")),
     CheckpointError, r"model\.safetensors\.index\.json: the shard index is not valid JSON"),
    ("shard index leaving the folder", lambda d: ((d / "model.safetensors").unlink(),
                                                  (d / "model.safetensors.index.json").write_text(
                                                      json.dumps({"weight_map": {"x": "../../etc/passwd"}}))),
     CheckpointError, r"model\.safetensors\.index\.json: shard '\.\./\.\./etc/passwd' \(of tensor 'x'\) is not a "
     r"\.safetensors or \.bin file beside the index"),
    # config.json
    ("missing config.json", _remove("config.json"), ModelNotFoundError,
     r"config\.json: no config\.json: not a sentence-transformers or Hugging Face model folder"),
    ("config.json not JSON", _write("config.json", "{"), ConfigError,
     r"config\.json: the model config is not valid JSON"),
    ("config.json not UTF-8", _write("config.json", b"\xff\xfe\x00x"), ConfigError,
     r"config\.json:1: the model config is not UTF-8 text"),
    ("config.json a list", _write("config.json", "[1]"), ConfigError,
     r"config\.json: the model config must be a JSON object, not list"),
    ("vocab_size 0", _edit_json("config.json", vocab_size=0), ConfigError, r"vocab_size=0"),
    ("negative hidden_size", _edit_json("config.json", hidden_size=-64), ConfigError, r"hidden_size=-64"),
    ("heads not dividing hidden", _edit_json("config.json", num_attention_heads=3), ConfigError,
     r"config\.json: .*(divisible|num_attention_heads)"),
    ("string where an int belongs", _edit_json("config.json", num_hidden_layers="2"), ConfigError,
     r"num_hidden_layers='2'"),
    ("float where an int belongs", _edit_json("config.json", intermediate_size=128.0), ConfigError,
     r"intermediate_size=128\.0"),
    ("layer_norm_eps 0", _edit_json("config.json", layer_norm_eps=0), ConfigError, r"layer_norm_eps=0"),
    ("layer_norm_eps negative", _edit_json("config.json", layer_norm_eps=-1e-5), ConfigError, r"layer_norm_eps"),
    ("layer_norm_eps a string", _edit_json("config.json", layer_norm_eps="1e-12"), ConfigError, r"layer_norm_eps"),
    ("hidden_act a list", _edit_json("config.json", hidden_act=["gelu"]), ConfigError,
     r"config\.json: .*(hidden_act|unhashable)"),
    ("model_type a list", _edit_json("config.json", model_type=["bert"]), ConfigError,
     r"config\.json: model_type=\['bert'\] is not supported \(supported: bert, roberta"),
    ("model_type missing", _edit_json("config.json", model_type=None), ConfigError,
     r"config\.json: model_type=None is not supported \(supported: bert, roberta"),
    ("sizes overflowing int64", _edit_json("config.json", max_position_embeddings=2**62, vocab_size=2**62),
     (ConfigError, CheckpointError), r"config\.json|model\.safetensors"),
    ("10**9 layers", _edit_json("config.json", num_hidden_layers=10**9), CheckpointError,
     r"model\.safetensors: config\.json asks for num_hidden_layers=1000000000 but the file holds only \d+ tensors"),
    # sentence-transformers files
    ("modules.json not JSON", _write("modules.json", "[{"), ConfigError,
     r"modules\.json: the module list is not valid JSON"),
    ("modules.json an object", _write("modules.json", "{}"), ConfigError,
     r"modules\.json: the module list must be a JSON list, not dict"),
    ("modules.json type not a str", _write("modules.json", json.dumps([{"type": 1, "path": ""}])), ConfigError,
     r"modules\.json: expected a list"),
    ("modules.json path leaving the folder", _write("modules.json", json.dumps(
        [{"idx": 0, "type": "sentence_transformers.models.Transformer", "path": "../.."}])),
     ConfigError, r"modules\.json: module path '\.\./\.\.' leads outside the model folder"),
    ("modules.json custom class", _write("modules.json", json.dumps(
        [{"idx": 0, "type": "my_package.MyTransformer", "path": ""}])),
     UnsupportedModuleError, r"modules\.json: module 'my_package\.MyTransformer' is not implemented"),
    ("modules.json CNN module", _write("modules.json", json.dumps(
        [{"idx": 0, "type": "sentence_transformers.models.Transformer", "path": ""},
         {"idx": 1, "type": "sentence_transformers.models.CNN", "path": "1_CNN"}])),
     UnsupportedModuleError, r"modules\.json: module 'sentence_transformers\.models\.CNN' is not implemented"),
    ("sentence_bert_config.json not JSON", _write("sentence_bert_config.json", "{oops"), ConfigError,
     r"sentence_bert_config\.json: the sentence-transformers config is not valid JSON"),
    ("sentence_bert_config.json a list", _write("sentence_bert_config.json", "[]"), ConfigError,
     r"sentence_bert_config\.json: the sentence-transformers config must be a JSON object"),
    ("max_seq_length a string", _write("sentence_bert_config.json", json.dumps({"max_seq_length": "128"})),
     ConfigError, r"sentence_bert_config\.json: max_seq_length='128' must be an integer >= 2"),
    ("max_seq_length 1", _write("sentence_bert_config.json", json.dumps({"max_seq_length": 1})),
     ConfigError, r"sentence_bert_config\.json: max_seq_length=1"),
    ("pooling config not JSON", _write("1_Pooling/config.json", "nope"), ConfigError,
     r"1_Pooling/config\.json: the pooling config is not valid JSON"),
    ("pooling config a list", _write("1_Pooling/config.json", "[]"), ConfigError,
     r"1_Pooling/config\.json: the pooling config must be a JSON object"),
    ("pooling mode an int", _write("1_Pooling/config.json", json.dumps({"pooling_mode": 3})), ConfigError,
     r"1_Pooling/config\.json: pooling_mode=3 must be a mode name or a list"),
    ("missing pooling config", _remove("1_Pooling/config.json"), ModelNotFoundError,
     r"1_Pooling/config\.json: missing pooling config"),
    # tokenizer files
    ("tokenizer.json not JSON", _write("tokenizer.json", "{"), ConfigError, r"tokenizer\.json: unreadable tokenizer"),
    ("tokenizer_config.json not JSON", _write("tokenizer_config.json", "{"), ConfigError,
     r"tokenizer_config\.json: the tokenizer config is not valid JSON"),
    ("tokenizer_config.json a list", _write("tokenizer_config.json", "[]"), ConfigError,
     r"tokenizer_config\.json: the tokenizer config must be a JSON object"),
    ("vocab.txt not UTF-8", lambda d: ((d / "tokenizer.json").unlink(), (d / "vocab.txt").write_bytes(b"\xff\x80")),
     ConfigError, r"vocab\.txt:1: the vocabulary is not UTF-8 text"),
    ("vocab.txt without special tokens", lambda d: ((d / "tokenizer.json").unlink(), (d / "vocab.txt").write_text("")),
     ConfigError, r"vocab\.txt: special token '\[UNK\]' is not in the vocabulary"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name, mutate, error, pattern", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_raises_error_naming_file_and_problem(tiny, tmp_path, arch, name, mutate, error, pattern):
    folder = copy_of(tiny(arch), tmp_path)
    mutate(folder)
    with pytest.raises(error, match=pattern) as caught:
        SentenceEncoder.from_pretrained(folder)
    assert isinstance(caught.value, MinisbertError) and isinstance(caught.value, (ValueError, OSError))
    assert str(tmp_path) in str(caught.value) or "config.json:" in str(caught.value), str(caught.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_unusual_but_valid_files_load(tiny, tmp_path, arch):
    """What must not be refused: float16/float64 weights (cast), no sentence_bert_config.json, and
    transformers' 1e30 'no limit' model_max_length."""
    folder = copy_of(tiny(arch), tmp_path)
    expected = SentenceEncoder.from_pretrained(folder).encode(["한국어 문장 임베딩"])
    _tensors(lambda s: s.update({k: v.double() for k, v in s.items()}))(folder)
    np.testing.assert_allclose(SentenceEncoder.from_pretrained(folder).encode(["한국어 문장 임베딩"]), expected,
                               atol=1e-6)
    _tensors(lambda s: s.update({k: v.half() for k, v in s.items()}))(folder)
    assert np.isfinite(SentenceEncoder.from_pretrained(folder).encode(["한국어 문장 임베딩"])).all()
    (folder / "sentence_bert_config.json").unlink()
    _edit_json("tokenizer_config.json", model_max_length=1000000000000000019884624838656)(folder)
    enc = SentenceEncoder.from_pretrained(folder)
    assert enc.max_seq_length == enc.arch.max_tokens(enc.model.config)


def test_sentence_transformers_fills_a_missing_tensor_randomly_we_refuse(tiny, tmp_path):
    """sentence-transformers (through transformers) loads a checkpoint missing a weight, initialises
    it randomly with only a logged warning, and returns different embeddings; we raise."""
    from safetensors.torch import load_file, save_file

    folder = copy_of(tiny("bert"), tmp_path)
    text = ["오늘 서울의 날씨는 맑고 바람이 조금 분다."]
    intact = st_model(folder).encode(text)
    state = load_file(folder / "model.safetensors")
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        filled = st_model(folder).encode(text)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    warned = "\n".join(r.getMessage() for r in records)
    # transformers 5 reports the key as MISSING; 4.x as "newly initialized".
    assert "encoder.layer.1.output.dense.weight" in warned, warned
    assert "MISSING" in warned or "newly initialized" in warned, warned
    assert np.abs(filled - intact).max() > 1e-3, "sentence-transformers' output did not change"
    named = r"encoder\.layer\.1\.output\.dense\.weight \(minisbert's blocks\.1\.ffn\.down"  # theirs, then ours
    with pytest.raises(CheckpointError, match=r"missing.*nothing is ever randomly initialised.*" + named):
        SentenceEncoder.from_pretrained(folder)


def test_hub_id_offline_and_nonexistent_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match=r"cannot fetch 'someone/ko-model'.*HF_HUB_OFFLINE"):
        SentenceEncoder.from_pretrained("someone/ko-model", revision="main")
    (tmp_path / "a_file").write_text("x")
    for path in (tmp_path / "a_file", tmp_path / "no" / "such" / "dir"):
        with pytest.raises(ModelNotFoundError, match="neither a model folder"):
            SentenceEncoder.from_pretrained(path)


# -- safe loading -----------------------------------------------------------------------------------


class _OpenFile:
    """Unpickling this calls open(path, "w"): creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class _System:
    """Unpickling this runs a shell command."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload", [_OpenFile, _System])
def test_pickle_that_would_run_code_is_refused_and_never_runs(tiny, tmp_path, payload):
    from safetensors.torch import load_file

    folder = copy_of(tiny("bert"), tmp_path)
    marker = tmp_path / "code_ran"
    state = dict(load_file(folder / "model.safetensors"), payload=payload(str(marker)))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load.*weights_only"):
        SentenceEncoder.from_pretrained(folder)
    assert not marker.exists()
    # The payload is live: unrestricted unpickling runs it.
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_plain_bin_checkpoint_loads_through_weights_only(tiny, tmp_path):
    from safetensors.torch import load_file

    folder = copy_of(tiny("bert"), tmp_path)
    expected = SentenceEncoder.from_pretrained(folder).encode(["안녕하세요"])
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(folder).encode(["안녕하세요"]), expected)


def test_no_remote_code_anywhere(tiny, tmp_path):
    """There is no trust_remote_code; auto_map in config.json and Python files in the folder are
    never imported."""
    params = inspect.signature(SentenceEncoder.from_pretrained).parameters
    assert "trust_remote_code" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())
    with pytest.raises(TypeError):
        SentenceEncoder.from_pretrained(tiny("bert"), trust_remote_code=True)

    folder = copy_of(tiny("bert"), tmp_path)
    marker = tmp_path / "imported"
    for module in ("modeling_evil.py", "configuration_evil.py", "evil.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    _edit_json("config.json", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                        "AutoModel": "modeling_evil.EvilModel"})(folder)
    assert np.isfinite(SentenceEncoder.from_pretrained(folder).encode(["안녕하세요"])).all()
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules + [{"idx": 2, "path": "", "type": "evil.Evil"}]))
    with pytest.raises(UnsupportedModuleError, match=r"module 'evil\.Evil' is not implemented"):
        SentenceEncoder.from_pretrained(folder)
    assert not marker.exists()


# -- batch invariance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_embedding_does_not_depend_on_batch(tiny, arch, fast):
    """Batch size 1 vs 7 vs 64 and a shuffled batch composition give the same embeddings. Each text is
    padded to its own length rounded up to 8, never to its neighbours', so BERT/RoBERTa's reference
    path is bitwise equal (padding to the longest text drifted by up to 3.6e-7 here, 4.8e-6 at
    bert-base size). DeBERTa-v2's explicit batched matmuls and the packed fast path stay within 1e-6."""
    enc = SentenceEncoder.from_pretrained(tiny(arch), fast=fast)
    tol = 0.0 if arch in ("bert", "roberta") and not fast else 1e-6
    texts = corpus(60) + ["", "a", "🙂", "한국어 " * 300]
    alone = enc.encode(texts, batch_size=1)
    for batch_size in (7, 64):
        together = enc.encode(texts, batch_size=batch_size)
        assert np.abs(together - alone).max() <= tol, f"{arch} batch {batch_size}: {max_diff(together, alone)}"
    order = np.random.default_rng(0).permutation(len(texts))
    shuffled = enc.encode([texts[i] for i in order], batch_size=16)
    assert np.abs(shuffled - alone[order]).max() <= tol, f"{arch} shuffled: {max_diff(shuffled, alone[order])}"


def test_padded_length_depends_on_the_text_alone(tiny):
    enc = SentenceEncoder.from_pretrained(tiny("bert"))
    lengths = [runner_module.padded_length(n, enc.max_tokens) for n in (2, 8, 9, 16, 17, 127, 128)]
    assert lengths == [8, 8, 16, 16, 24, 128, 128]
    limit = enc.arch.max_tokens(enc.model.config)
    assert runner_module.padded_length(limit, limit) == limit
    assert runner_module.padded_length(limit - 1, limit) <= limit


# -- resource bounds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_encode_streams_batches(tiny, monkeypatch, fast):
    """No model input holds more than one batch (every padded (rows, T) tensor is at most
    batch_size * max_seq_length tokens) and no more than one chunk of texts is tokenized at once."""
    monkeypatch.setattr(inference_module, "PLAN_CHUNK", 64)  # tokenize and plan 64 texts at a time
    enc = SentenceEncoder.from_pretrained(tiny("bert"), fast=fast)
    tokenized: list[int] = []
    padded: list[tuple[int, int]] = []
    encode_ids = enc.tokenizer.encode_ids
    monkeypatch.setattr(enc.tokenizer, "encode_ids", lambda texts: tokenized.append(len(texts)) or encode_ids(texts))
    # both runners pad through runner.embed_padded, which pads with tokenizer.pad_ids
    monkeypatch.setattr(runner_module, "pad_ids", lambda *a, **k: padded.append(tuple(pad_ids(*a, **k)[0].shape))
                        or pad_ids(*a, **k))
    texts = corpus(40) * 5
    assert enc.encode(texts, batch_size=16).shape == (200, enc.embedding_dim)
    assert sum(rows for rows, _ in padded) == 200 and max(rows * T for rows, T in padded) <= 16 * enc.max_seq_length
    # Both paths tokenize 64 texts at a time, each text once (the batches reuse the chunk's ids).
    assert max(tokenized) == 64 and sum(tokenized) == 200, tokenized


def test_memory_bench_smoke(tiny):
    command = [sys.executable, str(REPO / "scripts" / "memory_bench.py"), "--n", "300", "--model", str(tiny("bert")),
               "--threads", "1", "--tracemalloc"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "output           (300, 64) float32" in run.stdout, run.stdout
    assert "peak RSS" in run.stdout and "python peak" in run.stdout, run.stdout
    growth = float(run.stdout.split("(growth ")[1].split(" MiB")[0])
    assert 0 <= growth < 400, run.stdout
