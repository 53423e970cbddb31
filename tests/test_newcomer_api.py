"""A sentence-transformers user's first lines work unchanged: ``SentenceEncoder(name, **kwargs)`` as
``SentenceTransformer(name, **kwargs)`` (the same as ``from_pretrained``, its keywords translated, the
others refused by name), and ``from minisbert import util`` as ``from sentence_transformers import util``."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, st_model

from minisbert import SentenceEncoder

TEXTS = corpus(12, seed=5) + ["", "A man is playing guitar."]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT folder with prompts, for the settings keywords."""
    folder = make_checkpoint(tmp_path_factory.mktemp("bert"), "bert")
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "질문: "}}))
    return folder


# ---------------------------------------------------------------------------------------------------
# SentenceEncoder(name, **kwargs)


def test_constructor_equals_from_pretrained(minilm_path):
    ours, loaded = SentenceEncoder(minilm_path), SentenceEncoder.from_pretrained(minilm_path)
    assert type(ours) is SentenceEncoder and ours.source == loaded.source and ours.fast == loaded.fast
    assert np.array_equal(ours.encode(TEXTS), loaded.encode(TEXTS))


def test_short_name_as_positional_argument_equals_sentence_transformers(minilm_path):
    ours = SentenceEncoder("all-MiniLM-L6-v2")
    assert ours.source == SentenceEncoder.from_pretrained(minilm_path).source
    diff = np.abs(ours.encode(TEXTS) - st_model(minilm_path).encode(TEXTS)).max()
    assert diff <= TOL, f"max diff {diff}"


def test_sentence_transformers_keywords_are_translated(tiny, monkeypatch):
    """device, cache_folder, model_kwargs' dtype and the settings keywords act as sentence-transformers'
    constructor makes them act, and equal from_pretrained's own keywords."""
    from minisbert.io import hub

    cache_dirs = []
    resolve = hub.resolve
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: cache_dirs.append(k["cache_dir"]) or resolve(*a, **k))
    settings = dict(prompts={"doc": "문서: "}, default_prompt_name="query", similarity_fn_name="dot", truncate_dim=16)
    ours = SentenceEncoder(tiny, device=None, cache_folder="/tmp/hub-cache",
                           model_kwargs={"torch_dtype": torch.bfloat16}, **settings)
    want = SentenceEncoder.from_pretrained(tiny, dtype=torch.bfloat16, cache_dir="/tmp/hub-cache", **settings)
    assert cache_dirs == ["/tmp/hub-cache", "/tmp/hub-cache"]
    assert ours.dtype == torch.bfloat16 and ours.device == torch.device("cpu")
    assert ours.prompts == want.prompts and {"query": "질문: ", "doc": "문서: "}.items() <= ours.prompts.items()
    assert (ours.default_prompt_name, ours.similarity_fn_name, ours.truncate_dim) == ("query", "dot", 16)
    assert np.array_equal(ours.encode(TEXTS), want.encode(TEXTS))
    # transformers' new name for the dtype, and the dtype by name
    assert SentenceEncoder(tiny, model_kwargs={"dtype": "float16"}).dtype == torch.float16


@pytest.mark.parametrize("kwargs, named", [
    ({"backend": "onnx"}, "'backend'"),
    ({"trust_remote_code": True, "local_files_only": True}, "['local_files_only', 'trust_remote_code']"),
    ({"model_kwargs": {"attn_implementation": "sdpa"}}, "['attn_implementation']"),
])
def test_unknown_keywords_are_refused_by_name(tiny, kwargs, named):
    with pytest.raises(ValueError, match=r"SentenceEncoder\(.*unknown or unimplemented keys") as error:
        SentenceEncoder(tiny, **kwargs)
    assert named in str(error.value)


def test_keywords_that_disagree_are_refused(tiny):
    with pytest.raises(ValueError, match=r"model_kwargs\['torch_dtype'\]=torch.float16 and dtype=torch.bfloat16"):
        SentenceEncoder(tiny, dtype=torch.bfloat16, model_kwargs={"torch_dtype": torch.float16})
    with pytest.raises(ValueError, match="cache_folder='a' and cache_dir='b' disagree"):
        SentenceEncoder(tiny, cache_folder="a", cache_dir="b")


def test_the_keyword_list_is_from_pretrained_signature():
    """The constructor accepts exactly from_pretrained's keywords (plus sentence-transformers' names)."""
    from minisbert.encoding.options import FROM_PRETRAINED

    parameters = list(inspect.signature(SentenceEncoder.from_pretrained).parameters)
    assert tuple(parameters[1:]) == FROM_PRETRAINED


# ---------------------------------------------------------------------------------------------------
# from minisbert import util


UTIL_NAMES = ["cos_sim", "pytorch_cos_sim", "dot_score", "euclidean_sim", "manhattan_sim", "pairwise_cos_sim",
              "pairwise_dot_score", "pairwise_euclidean_sim", "pairwise_manhattan_sim", "semantic_search",
              "paraphrase_mining", "paraphrase_mining_embeddings", "quantize_embeddings", "normalize_embeddings"]


def test_util_has_sentence_transformers_names_with_one_implementation():
    from sentence_transformers import util as st_util

    from minisbert import quantize, search, util

    assert sorted(util.__all__) == sorted(UTIL_NAMES)
    assert all(hasattr(st_util, name) for name in util.__all__)
    # Imported, not copied: the same function objects as in search.py and quantize.py.
    owners = {name: quantize if name == "quantize_embeddings" else search for name in UTIL_NAMES}
    home = {"pytorch_cos_sim": "cos_sim", "normalize_embeddings": "normalize"}
    for name, module in owners.items():
        assert getattr(util, name) is getattr(module, home.get(name, name)), name


def vectors(seed: int, n: int, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["cos_sim", "pytorch_cos_sim", "dot_score", "euclidean_sim", "manhattan_sim"])
def test_util_score_matrices_equal_sentence_transformers(name):
    from sentence_transformers import util as st_util

    from minisbert import util

    a, b = vectors(0, 3), vectors(1, 4)
    for x, y in ((a, b), (a[0], b), (a.numpy(), b.numpy())):
        ours, theirs = getattr(util, name)(x, y), getattr(st_util, name)(x, y)
        assert ours.shape == theirs.shape == (len(a) if x.ndim == 2 else 1, 4)
        assert torch.equal(ours, theirs), f"{name}: max diff {(ours - theirs).abs().max()}"


@pytest.mark.parametrize("name", ["pairwise_cos_sim", "pairwise_dot_score", "pairwise_euclidean_sim",
                                  "pairwise_manhattan_sim"])
def test_util_pairwise_scores_equal_sentence_transformers(name):
    from sentence_transformers import util as st_util

    from minisbert import util

    a, b = vectors(2, 5), vectors(3, 5)
    ours, theirs = getattr(util, name)(a, b), getattr(st_util, name)(a, b)
    assert ours.shape == theirs.shape == (5,)
    assert torch.equal(ours, theirs), f"{name}: max diff {(ours - theirs).abs().max()}"


def test_util_normalize_embeddings_equals_sentence_transformers():
    from sentence_transformers import util as st_util

    from minisbert import util

    a = vectors(4, 6)
    assert torch.equal(util.normalize_embeddings(a), st_util.normalize_embeddings(a))


def test_util_search_and_mining_equal_sentence_transformers():
    from sentence_transformers import util as st_util

    from minisbert import util

    queries, docs = vectors(5, 3), vectors(6, 60)
    for kwargs in ({}, {"top_k": 5, "corpus_chunk_size": 7}, {"score_function": util.dot_score}):
        theirs = dict(kwargs, score_function=st_util.dot_score) if "score_function" in kwargs else kwargs
        assert util.semantic_search(queries, docs, **kwargs) == st_util.semantic_search(queries, docs, **theirs)
    for kwargs in ({}, {"top_k": 3, "max_pairs": 20, "corpus_chunk_size": 11}):
        assert util.paraphrase_mining_embeddings(docs, **kwargs) == st_util.paraphrase_mining_embeddings(docs, **kwargs)


def test_util_paraphrase_mining_equals_sentence_transformers(tiny):
    """The same encoder and texts through both functions give the same pairs."""
    from sentence_transformers import util as st_util

    from minisbert import util

    encoder, texts = SentenceEncoder(tiny), corpus(30, seed=9)
    assert util.paraphrase_mining(encoder, texts, top_k=4) == st_util.paraphrase_mining(encoder, texts, top_k=4)


@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_util_quantize_embeddings_equals_sentence_transformers(precision):
    from sentence_transformers import util as st_util

    from minisbert import util

    embeddings = vectors(7, 150, 16).numpy()
    ours, theirs = util.quantize_embeddings(embeddings, precision), st_util.quantize_embeddings(embeddings, precision)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
