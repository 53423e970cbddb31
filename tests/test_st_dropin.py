"""sentence-transformers as a drop-in: the same call on ``SentenceTransformer`` and ``SentenceEncoder``,
compared (fp32 embeddings <= 1e-5, quantized outputs exactly equal, errors where sentence-transformers
errors). Copying and pickling, ``save``, the rest of ``encode``'s surface, the search helpers."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import add_dense, corpus, make_checkpoint, single_thread, st_model

from minisbert import SentenceEncoder

TOL = 1e-5
ARCHS = ["bert", "roberta", "deberta-v2"]
TEXTS = corpus(40, seed=11) + ["", "짧다", "A man is playing guitar."]


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max()) if a.size else 0.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> a tiny random sentence-transformers folder of that architecture."""
    return {arch: make_checkpoint(tmp_path_factory.mktemp(arch), arch, max_seq_length=128) for arch in ARCHS}


# ---------------------------------------------------------------------------------------------------
# Copying and pickling


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fast", [True, False])
def test_deepcopy_and_pickle_give_an_independent_equal_encoder(tiny, arch, fast):
    enc = SentenceEncoder.from_pretrained(tiny[arch], fast=fast)
    want = enc.encode(TEXTS)
    for how, clone in (("deepcopy", copy.deepcopy(enc)), ("pickle", pickle.loads(pickle.dumps(enc)))):
        assert clone.fast == enc.fast and clone.arch is enc.arch and clone.model is not enc.model, how
        assert max_diff(clone.encode(TEXTS), want) == 0.0, how
        # Independent weights: changing the copy leaves the original as it was.
        with torch.no_grad():
            clone.model.blocks[0].ffn.up.weight.mul_(2.0)  # (not embeddings: a LayerNorm follows them)
        clone.fast = clone.fast  # the packed path copies fused weights: rebuilt after editing weights
        assert max_diff(clone.encode(TEXTS[:4]), want[:4]) > 1e-3, how
        assert max_diff(enc.encode(TEXTS[:4]), want[:4]) == 0.0, how


def test_sentence_transformers_copies_too(minilm_path):
    """The reference: sentence-transformers models deep-copy and pickle, and so must ours."""
    ref = st_model(minilm_path)
    copy.deepcopy(ref)
    pickle.dumps(ref)
    enc = SentenceEncoder.from_pretrained(minilm_path)
    assert max_diff(pickle.loads(pickle.dumps(copy.deepcopy(enc))).encode(TEXTS), ref.encode(TEXTS)) <= TOL


# ---------------------------------------------------------------------------------------------------
# save(): a folder sentence-transformers loads with the same embeddings


def write_settings(folder: Path, **settings) -> Path:
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_loads_in_sentence_transformers_with_equal_embeddings(tmp_path, arch):
    """Dense modules, Normalize, prompts, default prompt, similarity, truncate_dim, lowercasing and a
    changed max_seq_length all survive the round trip, into sentence-transformers and back into us."""
    src = make_checkpoint(tmp_path / "src", arch, pooling=("cls", "mean"), do_lower_case=True, max_seq_length=96)
    add_dense(src, [{"in_features": 128, "out_features": 48, "activation_function": torch.nn.ReLU()},
                    {"in_features": 48, "out_features": 32, "use_residual": True}], normalize=True)
    write_settings(src, prompts={"query": "질문: ", "passage": "문서: "}, default_prompt_name="query",
                   similarity_fn_name="dot", truncate_dim=24)
    enc = SentenceEncoder.from_pretrained(src)
    enc.max_seq_length = 20  # the encoder's state is saved, not the source folder's
    enc.save(tmp_path / "out")
    ref, back = st_model(tmp_path / "out"), SentenceEncoder.from_pretrained(tmp_path / "out")
    assert ref.max_seq_length == back.max_seq_length == 20
    assert ref.prompts == back.prompts == enc.prompts and ref.default_prompt_name == back.default_prompt_name == "query"
    assert ref.similarity_fn_name == back.similarity_fn_name == "dot" and ref.truncate_dim == back.truncate_dim == 24
    want = enc.encode(TEXTS)
    assert want.shape == (len(TEXTS), 24)
    assert max_diff(ref.encode(TEXTS), want) <= TOL
    assert max_diff(ref.encode(TEXTS, prompt_name="passage"), enc.encode(TEXTS, prompt_name="passage")) <= TOL
    assert max_diff(back.encode(TEXTS), want) == 0.0
    assert [type(m).__name__ for m in ref] == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]


def test_save_writes_the_current_weights_and_dtype(tmp_path, tiny):
    """What training changes is what is saved (issue 20's trainer saves through here)."""
    enc = SentenceEncoder.from_pretrained(tiny["roberta"])
    with torch.no_grad():
        enc.model.blocks[1].ffn.up.weight.mul_(1.5)
    enc.fast = enc.fast
    enc.save_pretrained(tmp_path / "trained", create_model_card=False)
    assert not (tmp_path / "trained" / "README.md").exists()
    assert max_diff(st_model(tmp_path / "trained").encode(TEXTS), enc.encode(TEXTS)) <= TOL
    assert max_diff(SentenceEncoder.from_pretrained(tiny["roberta"]).encode(TEXTS), enc.encode(TEXTS)) > 1e-3
    # Weights under Hugging Face's names, loadable by transformers' own model class.
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "trained" / "model.safetensors"))
    assert "encoder.layer.1.output.dense.bias" in keys and not any(k.startswith(("blocks.", "roberta.")) for k in keys)
    # A bfloat16 encoder writes bfloat16 weights and says so in config.json.
    half = SentenceEncoder.from_pretrained(tiny["roberta"], dtype=torch.bfloat16)
    half.save(tmp_path / "bf16", safe_serialization=False)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    state = torch.load(tmp_path / "bf16" / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    back = SentenceEncoder.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert max_diff(back.encode(TEXTS), half.encode(TEXTS)) == 0.0


def test_save_over_its_own_folder_and_minilm(tmp_path, minilm_path):
    enc = SentenceEncoder.from_pretrained(minilm_path)
    enc.save(tmp_path / "m")
    again = SentenceEncoder.from_pretrained(tmp_path / "m")
    again.save(tmp_path / "m")  # the tokenizer files copied onto themselves, weights replaced atomically
    assert max_diff(st_model(tmp_path / "m").encode(TEXTS), enc.encode(TEXTS)) <= TOL
    assert not [p for p in (tmp_path / "m").rglob("*.tmp")]
    assert oct((tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777) != "0o600"


def test_kobert_folder_saves_in_its_own_layout(tmp_path):
    pytest.importorskip("sentencepiece")
    from test_kobert import write_kobert_checkpoint

    enc = SentenceEncoder.from_pretrained(write_kobert_checkpoint(tmp_path / "src"))
    enc.save(tmp_path / "out")
    modules = json.loads((tmp_path / "out" / "modules.json").read_text())
    assert modules[0]["path"] == "0_KoBertTransformer" and modules[0]["type"].endswith("KoBertTransformer")
    assert max_diff(SentenceEncoder.from_pretrained(tmp_path / "out").encode(TEXTS), enc.encode(TEXTS)) == 0.0
