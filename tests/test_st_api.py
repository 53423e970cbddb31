"""The rest of sentence-transformers' encoding surface, held to sentence-transformers itself: the prompts,
default prompt, truncate_dim and similarity function of ``config_sentence_transformers.json``, and
``convert_to_tensor``. Each test writes those settings beside the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus, st_model

from minisbert import SentenceEncoder
from minisbert.errors import ConfigError

TOL = 1e-5
TEXTS = corpus(40, seed=3) + ["오늘 날씨가 맑다.", "A man is playing guitar.", ""]


def with_files(src: str, dst: Path, files: dict[str, object]) -> Path:
    """A model folder at ``dst``: links to ``src``'s entries, except ``files`` (relative path -> JSON),
    written fresh so that the package's own files are never touched."""
    dst.mkdir(parents=True)
    tops = {Path(name).parts[0] for name in files}
    for entry in os.listdir(src):
        if entry not in tops:
            os.symlink(Path(src) / entry, dst / entry)
        elif (Path(src) / entry).is_dir():  # a folder holding a replaced file: link the rest of it
            (dst / entry).mkdir()
            for inner in os.listdir(Path(src) / entry):
                if f"{entry}/{inner}" not in files:
                    os.symlink(Path(src) / entry / inner, dst / entry / inner)
    for name, content in files.items():
        (dst / name).write_text(json.dumps(content), encoding="utf-8")
    return dst


def settings_folder(minilm_path: str, dst: Path, **settings) -> Path:
    return with_files(minilm_path, dst, {"config_sentence_transformers.json": settings})


def close(a, b, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    diff = np.abs(a - b).max() if a.size else 0.0
    assert diff <= TOL, f"{what}: max abs diff {diff:.3e}"


@pytest.mark.slow  # 14 encodes of 43 texts with MiniLM: ~12 s on 2 free cores, the most of any test left
def test_prompts_equal_sentence_transformers(minilm_path, tmp_path):
    folder = settings_folder(minilm_path, tmp_path / "m", prompts={"query": "query: ", "passage": "passage: "},
                             default_prompt_name="query")
    ours, ref = SentenceEncoder.from_pretrained(folder), st_model(folder)
    assert ours.prompts == ref.prompts and ours.default_prompt_name == ref.default_prompt_name == "query"
    default = ours.encode(TEXTS)
    close(default, ref.encode(TEXTS), "default prompt")
    # The default prompt is really applied: without it the embeddings move.
    assert np.abs(default - ours.encode(TEXTS, prompt="")).max() > 1e-2
    close(default, ours.encode([f"query: {t}" for t in TEXTS], prompt=""), "default prompt = text prepended")
    for kwargs in ({"prompt_name": "passage"}, {"prompt": "검색: "}, {"prompt": ""}, {"prompt_name": "document"},
                   {"prompt": "검색: ", "prompt_name": "passage"}):
        close(ours.encode(TEXTS, **kwargs), ref.encode(TEXTS, **kwargs), f"encode(**{kwargs})")
    close(ours.encode_query(TEXTS), ref.encode_query(TEXTS), "encode_query")
    close(ours.encode_document(TEXTS), ref.encode_document(TEXTS), "encode_document")
    close(ours.encode_document(TEXTS, prompt_name="passage"), ref.encode_document(TEXTS, prompt_name="passage"),
          "encode_document(prompt_name='passage')")
    with pytest.raises(ValueError, match="'title'"):
        ours.encode(TEXTS, prompt_name="title")


def test_include_prompt_false_pools_without_the_prompt(minilm_path, tmp_path):
    pooling = json.loads((Path(minilm_path) / "1_Pooling" / "config.json").read_text())
    folder = with_files(minilm_path, tmp_path / "m", {
        "config_sentence_transformers.json": {"prompts": {"query": "query: "}},
        "1_Pooling/config.json": dict(pooling, include_prompt=False)})
    enc, ref = SentenceEncoder.from_pretrained(folder), st_model(folder)
    close(enc.encode(TEXTS), ref.encode(TEXTS), "include_prompt=false, no prompt")
    with_prompt = enc.encode(TEXTS, prompt_name="query")
    close(with_prompt, ref.encode(TEXTS, prompt_name="query"), "include_prompt=false, prompt left out of the pooling")
    # Left out, not ignored: the prompt's tokens still change every other token's state.
    assert np.abs(with_prompt - enc.encode(TEXTS)).max() > 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_truncate_dim_equals_sentence_transformers(minilm_path, tmp_path, normalize):
    folder = settings_folder(minilm_path, tmp_path / "m", truncate_dim=128)
    ours, ref = SentenceEncoder.from_pretrained(folder), st_model(folder)
    assert ours.get_sentence_embedding_dimension() == ref.get_sentence_embedding_dimension() == 128
    assert ours.embedding_dim == 384  # what the model and pooling produce
    a = ours.encode(TEXTS, normalize_embeddings=normalize)
    assert a.shape == (len(TEXTS), 128)
    close(a, ref.encode(TEXTS, normalize_embeddings=normalize), "truncate_dim from the settings")
    # Cut after the model's Normalize: unit length only when normalize_embeddings asks again.
    norms = np.linalg.norm(a, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize
    close(ours.encode(TEXTS, truncate_dim=16, normalize_embeddings=normalize),
          ref.encode(TEXTS, truncate_dim=16, normalize_embeddings=normalize), "encode(truncate_dim=16)")
    close(ours.encode(TEXTS[0], truncate_dim=1000), ref.encode(TEXTS[0], truncate_dim=1000), "wider than the model")
    with pytest.raises(ValueError, match="truncate_dim"):
        ours.encode(TEXTS, truncate_dim=0)


@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_equals_sentence_transformers(minilm_path, tmp_path, name):
    folder = settings_folder(minilm_path, tmp_path / "m", similarity_fn_name=name)
    ours, ref = SentenceEncoder.from_pretrained(folder), st_model(folder)
    assert ours.similarity_fn_name == ref.similarity_fn_name == name
    a, b = ours.encode(TEXTS[:7]), ours.encode(TEXTS[7:12])
    expected = ref.similarity(a, b).numpy()
    got = ours.similarity(a, b)
    assert isinstance(got, torch.Tensor) and got.shape == (7, 5)
    close(got, expected, f"{name} similarity")
    # Single vectors, lists of vectors, tensors and half precision, as sentence-transformers takes them.
    close(ours.similarity(a[0], b), ref.similarity(a[0], b).numpy(), f"{name}: one vector")
    close(ours.similarity(list(a), torch.from_numpy(b)), expected, f"{name}: a list of arrays, a tensor")
    half = torch.from_numpy(a).half()
    close(ours.similarity(half, b), ref.similarity(half, b).numpy(), f"{name}: float16")
    # On the model's own embeddings the cosine scores are the cosines.
    if name == "cosine":
        cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
        close(got, cos, "cosine by hand")


def test_convert_to_tensor(minilm_path):
    enc = SentenceEncoder.from_pretrained(minilm_path)
    t = enc.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (len(TEXTS), 384)
    np.testing.assert_array_equal(t.numpy(), enc.encode(TEXTS))
    # convert_to_tensor wins over convert_to_numpy, as in sentence-transformers.
    assert isinstance(enc.encode(TEXTS[0], convert_to_tensor=True, convert_to_numpy=True), torch.Tensor)


@pytest.mark.parametrize("settings, key", [
    ({"prompts": ["query: "]}, "prompts"),
    ({"prompts": {"query": 3}}, "prompts"),
    ({"prompts": {"query": "q: "}, "default_prompt_name": "passage"}, "default_prompt_name"),
    ({"similarity_fn_name": "maxsim"}, "similarity_fn_name"),
    ({"truncate_dim": 0}, "truncate_dim"),
    ({"truncate_dim": "64"}, "truncate_dim"),
])
def test_bad_settings_name_the_key(minilm_path, tmp_path, settings, key):
    folder = settings_folder(minilm_path, tmp_path / "m", **settings)
    with pytest.raises(ConfigError, match=f"config_sentence_transformers.json: {key}="):
        SentenceEncoder.from_pretrained(folder)


def test_bad_include_prompt_names_the_key(minilm_path, tmp_path):
    pooling = json.loads((Path(minilm_path) / "1_Pooling" / "config.json").read_text())
    folder = with_files(minilm_path, tmp_path / "m", {"1_Pooling/config.json": dict(pooling, include_prompt="no")})
    with pytest.raises(ConfigError, match="include_prompt='no'"):
        SentenceEncoder.from_pretrained(folder)


def test_cli_prompt_and_truncate_dim(minilm_path, tmp_path):
    from minisbert.cli import main

    folder = settings_folder(minilm_path, tmp_path / "m", prompts={"passage": "passage: "})
    out = tmp_path / "e.npy"
    assert main(["encode", "--model", str(folder), "--prompt-name", "passage", "--truncate-dim", "32",
                 "--output", str(out), *TEXTS[:3]]) == 0
    expected = SentenceEncoder.from_pretrained(folder).encode(TEXTS[:3], prompt_name="passage", truncate_dim=32)
    np.testing.assert_array_equal(np.load(out), expected)


def test_inspect_shows_the_settings(minilm_path, tmp_path, capsys):
    from minisbert.cli import main

    folder = settings_folder(minilm_path, tmp_path / "m", prompts={"query": "query: "}, default_prompt_name="query",
                             similarity_fn_name="dot", truncate_dim=64)
    assert main(["inspect", "--model", str(folder), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["sentence_transformers"]
    assert (st["prompts"], st["default_prompt_name"], st["similarity_fn_name"], st["truncate_dim"]) == \
        ({"query": "query: "}, "query", "dot", 64)
    assert main(["inspect", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "embedding dim 384 (cut to 64)" in out and "similarity dot · prompts query 'query: '" in out
