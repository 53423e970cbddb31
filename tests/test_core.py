"""The public API's contract, the pure helpers on hand-sized tensors, and errors that name the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint

from minisbert import CheckpointError, ConfigError, ModelNotFoundError, SentenceEncoder, UnsupportedModuleError
from minisbert.models.roberta import roberta_position_ids
from minisbert.modules.pooling import pool

# -- pure helpers --------------------------------------------------------------------------------


def test_roberta_position_ids_start_after_pad_and_skip_pads():
    pad = 1
    ids = torch.tensor([[0, 5, 6, 2, 1, 1],
                        [0, 7, 2, 1, 1, 1],
                        [0, 5, 6, 7, 8, 2]])
    expected = torch.tensor([[2, 3, 4, 5, 1, 1],
                             [2, 3, 4, 1, 1, 1],
                             [2, 3, 4, 5, 6, 7]])
    assert torch.equal(roberta_position_ids(ids, pad), expected)


def test_pooling_modes_by_hand():
    # B=2, T=3, C=2; second row has one pad.
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
                      [[2.0, 0.0], [4.0, 8.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.allclose(pool(x, mask, ("mean",)), torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    assert torch.equal(pool(x, mask, ("cls",)), torch.tensor([[1.0, 2.0], [2.0, 0.0]]))
    assert torch.equal(pool(x, mask, ("max",)), torch.tensor([[5.0, 6.0], [4.0, 8.0]]))
    assert torch.equal(pool(x, mask, ("lasttoken",)), torch.tensor([[5.0, 6.0], [4.0, 8.0]]))
    sqrt = pool(x, mask, ("mean_sqrt_len_tokens",))
    assert torch.allclose(sqrt, torch.tensor([[9.0, 12.0], [6.0, 8.0]]) / torch.tensor([[3.0], [2.0]]).sqrt())
    # weights 1, 2, 3 over the real tokens: row 0 -> (1*1+2*3+3*5)/6 = 22/6
    weighted = pool(x, mask, ("weightedmean",))
    assert torch.allclose(weighted, torch.tensor([[22 / 6, 28 / 6], [10 / 3, 16 / 3]]))
    both = pool(x, mask, ("cls", "mean"))
    assert both.shape == (2, 4)


def test_mean_pool_all_pad_row_is_zero_not_nan():
    x = torch.ones(1, 2, 3)
    assert torch.equal(pool(x, torch.zeros(1, 2, dtype=torch.long), ("mean",)), torch.zeros(1, 3))


# -- API contract ------------------------------------------------------------------------------------


def test_encode_shapes_order_and_types(tiny_bert):
    enc = SentenceEncoder.from_pretrained(tiny_bert)
    texts = corpus(50)
    full = enc.encode(texts, batch_size=7)
    assert full.shape == (50, enc.embedding_dim) and full.dtype == np.float32
    # Order of results = order of inputs, whatever the sorting inside.
    for i in (0, 13, 49):
        np.testing.assert_allclose(enc.encode(texts[i]), full[i], atol=1e-6)
    assert enc.encode(texts[0]).shape == (enc.embedding_dim,)
    assert enc.encode([]).shape == (0,)  # sentence-transformers' empty array
    tensors = enc.encode(texts[:3], convert_to_numpy=False)  # a list of per-text tensors, as there
    assert isinstance(tensors, list) and all(t.dtype == torch.float32 and t.shape == full[0].shape for t in tensors)
    normed = enc.encode(texts[:5], normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-6)
    with pytest.raises(TypeError, match=r"sentences\[1\] is int"):
        enc.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["ok"], batch_size=0)


def test_max_seq_length_is_settable(tiny_roberta):
    enc = SentenceEncoder.from_pretrained(tiny_roberta)
    assert enc.max_seq_length == 512
    enc.max_seq_length = 8
    ids, mask = enc.tokenizer(["한국어 " * 50])
    assert ids.shape == (1, 8)
    with pytest.raises(ValueError, match="positions"):
        enc.max_seq_length = 600  # 514 positions - pad - 1 = 512 usable


def test_progress_bar_can_be_forced(tiny_bert, capsys):
    enc = SentenceEncoder.from_pretrained(tiny_bert)
    enc.encode(corpus(10), batch_size=2, show_progress_bar=True)
    assert "Batches" in capsys.readouterr().err


# -- errors that name the problem ---------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "bert")
    state = load_file(path / "model.safetensors")

    broken = dict(state)
    del broken["encoder.layer.1.output.dense.weight"]
    save_file(broken, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.ffn\.down\.weight"):
        SentenceEncoder.from_pretrained(path)

    save_file(dict(state, **{"encoder.layer.1.surprise.weight": torch.zeros(2)}), path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.layer\.1\.surprise\.weight"):
        SentenceEncoder.from_pretrained(path)

    wrong = dict(state, **{"encoder.layer.0.attention.self.query.weight": torch.zeros(64, 32)})
    save_file(wrong, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"query\.weight.*\(64, 32\).*\(64, 64\)"):
        SentenceEncoder.from_pretrained(path)

    ints = dict(state, **{"embeddings.LayerNorm.bias": torch.zeros(64, dtype=torch.int32)})
    save_file(ints, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"LayerNorm\.bias.*int32"):
        SentenceEncoder.from_pretrained(path)


def test_config_refuses_what_is_not_implemented(tmp_path):
    path = make_checkpoint(tmp_path / "m", "bert")
    config = json.loads((path / "config.json").read_text())
    for key, value, pattern in [("position_embedding_type", "relative_key", "position_embedding_type"),
                                ("num_attention_heads", 5, "not divisible"),
                                ("model_type", "gpt2", "model_type='gpt2'.*supported: bert, roberta"),
                                ("hidden_act", "swish", "hidden_act")]:
        (path / "config.json").write_text(json.dumps(dict(config, **{key: value})))
        with pytest.raises(ConfigError, match=pattern):
            SentenceEncoder.from_pretrained(path)


def test_unsupported_module_is_named(tmp_path):
    path = make_checkpoint(tmp_path / "m", "bert")
    modules = json.loads((path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_CNN", "type": "sentence_transformers.models.CNN"})
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModuleError, match="sentence_transformers.models.CNN"):
        SentenceEncoder.from_pretrained(path)


def test_missing_paths_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="neither a model folder"):
        SentenceEncoder.from_pretrained(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE.*local folder"):
        SentenceEncoder.from_pretrained("jhgan/ko-sbert-nli-does-not-exist")
    path = make_checkpoint(tmp_path / "m", "bert")
    for name in ("tokenizer.json", "vocab.txt"):
        (path / name).unlink()
    with pytest.raises(ModelNotFoundError, match="no tokenizer files"):
        SentenceEncoder.from_pretrained(path)


def test_manifest_short_names_resolve(monkeypatch, tmp_path):
    from minisbert.io import hub

    names = set(hub.short_names())
    assert {"ko-sroberta-multitask", "klue-sroberta-base-continue-learning-by-mnr", "ko-sbert-nli",
            "kf-deberta-multitask"} <= names
    # A downloaded short name is found in weights/NAME without the hub.
    monkeypatch.setenv("MINISBERT_WEIGHTS", str(tmp_path))
    (tmp_path / "models.json").write_text(json.dumps({"models": [{"name": "tiny", "hub_id": "x/tiny"}]}))
    make_checkpoint(tmp_path / "tiny", "bert")
    assert SentenceEncoder.from_pretrained("tiny").embedding_dim == 64


# -- CLI -----------------------------------------------------------------------------------------------


def test_cli_encode(tiny_bert, tmp_path):
    out = tmp_path / "e.npy"
    texts = ["안녕하세요?", "한국어 문장 임베딩을 위한 버트 모델입니다."]
    run = subprocess.run([sys.executable, "-m", "minisbert", "encode", "--model", str(tiny_bert),
                          "--output", str(out), "--normalize", *texts], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    expected = SentenceEncoder.from_pretrained(tiny_bert).encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)
    stdin = subprocess.run([sys.executable, "-m", "minisbert", "encode", "--model", str(tiny_bert)],
                           input="\n".join(texts) + "\n", capture_output=True, text=True)
    rows = [json.loads(line) for line in stdin.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts and len(rows[0]["embedding"]) == 64
    bad = subprocess.run([sys.executable, "-m", "minisbert", "encode", "--model", str(tmp_path / "none"), "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "neither a model folder" in bad.stderr
