"""Fuzzing: arbitrary Unicode (surrogates included) in arbitrary batches, and mutated checkpoint files.

Text: no exception, finite output, each row equal to the text encoded alone, equal to
sentence-transformers where it can take the text. Files: random byte flips, truncations, insertions
and deletions of a small real checkpoint's files give a minisbert error or a model that encodes; never
another exception type, a crash or a hang."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_checkpoint, single_thread, st_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisbert import SentenceEncoder
from minisbert.errors import MinisbertError
from minisbert.models import ARCHITECTURES
from minisbert.text.tokenizer import clean_text

ARCHS = ["bert", "roberta", pytest.param("deberta-v2", marks=pytest.mark.skipif(
    "deberta-v2" not in ARCHITECTURES, reason="deberta-v2 is not registered in minisbert.models"))]
FUZZ = settings(max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def one_thread():
    # Hundreds of tiny forwards: OpenMP's barrier on a loaded 2-core machine would dominate.
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            # max_seq_length 32: the fuzzed texts often reach it, so truncation is fuzzed too.
            made[arch] = make_checkpoint(tmp_path_factory.mktemp(arch.replace("-", "")), arch, max_seq_length=32,
                                         do_lower_case=arch == "roberta")
        return made[arch]
    return get


# Any code point, surrogates included (hypothesis excludes category Cs unless told not to).
ANY_CHAR = st.characters(exclude_categories=())
WORDS = ["한국어", "문장", "임베딩", "[MASK]", "[CLS]", "##", "café", "ÅÉÎ", "🙂", "👨‍👩‍👧", "\u200b", "\ud800",
         "가" * 120, "Hello,", "world!", "1,250,000원", "\u1100\u1161", "ΣΑΣ", "İstanbul", "\x00", "中文"]
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=30),
    st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join),  # long enough to be truncated
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(ANY_CHAR, max_size=5)), max_size=20).map(
        lambda parts: " ".join(parts)),
)


@pytest.mark.parametrize("arch", ARCHS)
def test_any_text_in_any_batch(tiny, arch):
    enc = SentenceEncoder.from_pretrained(tiny(arch))

    @FUZZ
    @given(texts=st.lists(TEXT, min_size=1, max_size=8), batch_size=st.integers(1, 8))
    def check(texts, batch_size):
        together = enc.encode(texts, batch_size=batch_size)
        assert together.shape == (len(texts), enc.embedding_dim) and np.isfinite(together).all()
        for text, row in zip(texts, together):
            alone = enc.encode(text)
            diff = np.abs(alone - row).max()
            assert diff <= 1e-6, f"{text!r}: batch vs alone max abs diff {diff:.3e}"

    check()


def test_any_text_equals_sentence_transformers(tiny):
    """sentence-transformers cannot take surrogates; on the same texts with them replaced by U+FFFD
    (what we do) the embeddings agree."""
    path = tiny("roberta")  # lowercasing + klue/roberta-style ids
    ours, ref = SentenceEncoder.from_pretrained(path), st_model(path)

    @FUZZ
    @given(texts=st.lists(TEXT, min_size=1, max_size=6))
    def check(texts):
        a = ours.encode(texts)
        b = ref.encode([clean_text(t) for t in texts])
        assert np.abs(a - b).max() <= 1e-5, f"{texts!r}: max abs diff {np.abs(a - b).max():.3e}"

    check()


@pytest.mark.parametrize("which", ["minilm", "roberta"])
def test_cutting_long_texts_never_changes_tokens(tiny, minilm_path, which):
    """With the cut bound forced down to one character per token, cut and whole texts give equal ids."""
    enc = SentenceEncoder.from_pretrained(minilm_path if which == "minilm" else tiny("roberta"))
    tok = enc.tokenizer
    assert tok.cut_is_safe
    tok.max_seq_length, tok.cut_chars_per_token = 12, 1

    @FUZZ
    @given(texts=st.lists(TEXT, min_size=1, max_size=6))
    def check(texts):
        cut = tok.encode_ids(texts)
        tok.cut_is_safe = False
        try:
            whole = tok.encode_ids(texts)
        finally:
            tok.cut_is_safe = True
        assert cut == whole

    check()


# -- mutated files -------------------------------------------------------------------------------------

FILES = ["model.safetensors", "pytorch_model.bin", "config.json", "modules.json", "sentence_bert_config.json",
         "1_Pooling/config.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt"]


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    """A tiny BERT (vocab 300, so the files are small) with safetensors, and its twin with a .bin and
    only vocab.txt (so pytorch_model.bin and vocab.txt are the files read there)."""
    root = tmp_path_factory.mktemp("fuzz")
    st_folder = make_checkpoint(root / "st", "bert", vocab_size=300, max_seq_length=32)
    bin_folder = Path(shutil.copytree(st_folder, root / "bin"))
    from safetensors.torch import load_file

    torch.save(load_file(bin_folder / "model.safetensors"), bin_folder / "pytorch_model.bin")
    (bin_folder / "model.safetensors").unlink()
    (bin_folder / "tokenizer.json").unlink()
    return st_folder, bin_folder


MUTATION = st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete"]),
                     st.floats(0, 1, exclude_max=True), st.booleans(), st.binary(min_size=1, max_size=8))


def mutate(data: bytes, ops) -> bytes:
    """Apply (kind, where in [0, 1), near the start?, bytes) operations; 'near the start' aims at the
    first 256 bytes, where the safetensors header, a zip's first entry and JSON keys are."""
    data = bytearray(data)
    for kind, where, near_start, payload in ops:
        span = min(len(data), 256) if near_start else len(data)
        at = int(where * span) if span else 0
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] ^= payload[0] or 0xFF
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "delete":
            del data[at: at + len(payload)]
    return bytes(data)


@pytest.mark.parametrize("name", FILES)
def test_mutated_files_give_minisbert_errors_or_load(small_checkpoints, tmp_path_factory, name):
    st_folder, bin_folder = small_checkpoints
    source = bin_folder if name in ("pytorch_model.bin", "vocab.txt") else st_folder
    original = (source / name).read_bytes()
    outcomes: dict[str, int] = {}

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(ops=st.lists(MUTATION, min_size=1, max_size=4))
    def check(ops):
        folder = tmp_path_factory.mktemp("mutated")
        # Links to the intact files; only the mutated one is a real copy.
        for path in source.rglob("*"):
            if path.is_file():
                (folder / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path, folder / path.relative_to(source))
        (folder / name).unlink()
        (folder / name).write_bytes(mutate(original, ops))
        try:
            enc = SentenceEncoder.from_pretrained(folder)
        except MinisbertError as e:
            assert isinstance(e, (ValueError, OSError))
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            return
        finally:
            shutil.rmtree(folder)
        # Loaded: the mutation hit something harmless (or weight bytes, which no file format can
        # check); encoding must still work and give the right shape.
        out = enc.encode(["안녕하세요", "", "한국어 문장 " * 20])
        assert out.shape == (3, enc.embedding_dim)
        outcomes["loaded"] = outcomes.get("loaded", 0) + 1

    check()
    print(f"{name}: {json.dumps(outcomes)}")
