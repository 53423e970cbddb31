"""Parity is the specification: minisbert equals transformers (hidden states) and sentence-transformers
(embeddings), max abs diff <= 1e-5 in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, st_model

from minisbert import SentenceEncoder

TOL = 1e-5


def edge_texts() -> list[str]:
    return ["", "   ", "\t\n", "🙂👍🏽🇰🇷", "ÅÉÎ café naïve", "Hello WORLD, MiXeD case", "a" * 3000,
            "한국어 " * 400, "ㅋㅋㅋㅋ ㅎㅎ", "中文字符和日本語のテキスト"]


def assert_close(a: np.ndarray, b: np.ndarray, what: str, tol: float = TOL) -> None:
    diff = np.abs(a - b)
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3e}, mean {diff.mean():.3e} (tol {tol})"


def test_minilm_real_weights_equal_sentence_transformers(minilm_path):
    texts = corpus(300) + edge_texts() + ["The cat sits outside", "A man is playing guitar."]
    ours = SentenceEncoder.from_pretrained(minilm_path)
    ref = st_model(minilm_path)
    assert ours.embedding_dim == 384 and ours.max_seq_length == ref.max_seq_length == 256
    a = ours.encode(texts, batch_size=32)
    b = ref.encode(texts, batch_size=32, convert_to_numpy=True)
    assert a.shape == b.shape == (len(texts), 384) and a.dtype == np.float32
    assert_close(a, b, "all-MiniLM-L6-v2 vs sentence-transformers")
    # Normalize module: unit length.
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("arch", ["roberta", "bert"])
@pytest.mark.parametrize("batch_size", [1, 32])
def test_tiny_seed_configs_equal_sentence_transformers(arch, batch_size, tiny_roberta, tiny_bert):
    path = tiny_roberta if arch == "roberta" else tiny_bert
    texts = corpus(120 if batch_size == 32 else 40) + edge_texts()
    ours = SentenceEncoder.from_pretrained(path)
    ref = st_model(path)
    assert ours.max_seq_length == ref.max_seq_length
    a = ours.encode(texts, batch_size=batch_size)
    b = ref.encode(texts, batch_size=batch_size)
    assert_close(a, b, f"tiny {arch}, batch {batch_size}")


@pytest.mark.parametrize("arch", ["roberta", "bert"])
def test_hidden_states_equal_transformers(arch, tiny_roberta, tiny_bert):
    """Token states of every non-pad position equal transformers' last_hidden_state."""
    import transformers

    path = tiny_roberta if arch == "roberta" else tiny_bert
    ours = SentenceEncoder.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(str(path)).eval()
    texts = corpus(16) + ["", "한국어 " * 600]  # mixed lengths, one truncated
    input_ids, mask = ours.tokenizer(texts)
    with torch.inference_mode():
        a = ours.model(input_ids, mask)
        b = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert_close(a[keep].numpy(), b[keep].numpy(), f"{arch} hidden states")


def test_tokenization_matches_sentence_transformers(tiny_roberta, tiny_bert):
    texts = corpus(100) + edge_texts()
    for path in (tiny_roberta, tiny_bert):
        ours = SentenceEncoder.from_pretrained(path)
        ref = st_model(path)
        ids, mask = ours.tokenizer(texts)
        features = ref.tokenize(texts)
        assert torch.equal(mask, features["attention_mask"]), path
        assert torch.equal(ids[mask.bool()], features["input_ids"][mask.bool()]), path


def test_lowercasing_like_sentence_transformers(tiny_roberta):
    """The bespin model lowercases its input (do_lower_case=true in sentence_bert_config.json)."""
    ours = SentenceEncoder.from_pretrained(tiny_roberta)
    assert ours.tokenizer.do_lower_case
    a = ours.encode(["Hello WORLD 한국어", "  MiXeD  "])
    b = ours.encode(["hello world 한국어", "mixed"])
    np.testing.assert_array_equal(a, b)


def test_all_pooling_modes_and_normalize(tmp_path):
    modes = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
    path = make_checkpoint(tmp_path / "m", "roberta", max_seq_length=48, pooling=modes, normalize=True)
    ours = SentenceEncoder.from_pretrained(path)
    assert ours.embedding_dim == 64 * len(modes)
    texts = corpus(60) + edge_texts()
    for batch_size in (1, 16):
        assert_close(ours.encode(texts, batch_size=batch_size), st_model(path).encode(texts, batch_size=batch_size),
                     f"six pooling modes + Normalize, batch {batch_size}")


def test_vocab_txt_tokenizer_equals_tokenizer_json(tmp_path):
    """Without tokenizer.json the WordPiece pipeline is rebuilt from vocab.txt + tokenizer_config.json."""
    with_json = make_checkpoint(tmp_path / "json", "bert")
    without = make_checkpoint(tmp_path / "vocab", "bert", write_tokenizer_json=False)
    texts = corpus(100) + edge_texts()
    a = SentenceEncoder.from_pretrained(with_json).tokenizer(texts)
    b = SentenceEncoder.from_pretrained(without).tokenizer(texts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert_close(SentenceEncoder.from_pretrained(without).encode(texts), st_model(without).encode(texts),
                 "vocab.txt tokenizer vs sentence-transformers")


def test_plain_hugging_face_folder_gets_mean_pooling(tmp_path):
    path = make_checkpoint(tmp_path / "hf", "bert")
    (path / "modules.json").unlink()
    (path / "sentence_bert_config.json").unlink()
    ours = SentenceEncoder.from_pretrained(path)
    assert ours.folder.pooling.modes == ("mean",) and not ours.folder.normalize
    texts = corpus(40)
    assert_close(ours.encode(texts), st_model(path).encode(texts), "bare Hugging Face folder")


def test_legacy_bin_loads_through_safe_loader(tmp_path):
    """A .bin-only checkpoint (as ko-sroberta-multitask and ko-sbert-nli on the hub) loads and converts."""
    from safetensors.torch import load_file

    from minisbert.cli import main

    path = make_checkpoint(tmp_path / "bin", "roberta")
    state = load_file(path / "model.safetensors")
    torch.save({"roberta." + k: v for k, v in state.items()}, path / "pytorch_model.bin")
    reference = SentenceEncoder.from_pretrained(path).encode(corpus(20))
    (path / "model.safetensors").unlink()
    from_bin = SentenceEncoder.from_pretrained(path).encode(corpus(20))
    np.testing.assert_array_equal(from_bin, reference)
    assert main(["convert", str(path)]) == 0
    converted = load_file(path / "model.safetensors")
    assert set(converted) == {"roberta." + k for k in state}
    (path / "pytorch_model.bin").unlink()
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(path).encode(corpus(20)), reference)


def test_sharded_safetensors(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "sharded", "bert")
    reference = SentenceEncoder.from_pretrained(path).encode(corpus(10))
    state = load_file(path / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, path / name)
    (path / "model.safetensors").unlink()
    weight_map = {k: name for name, part in halves.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(path).encode(corpus(10)), reference)
