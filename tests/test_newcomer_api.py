"""A sentence-transformers user's first lines work unchanged: ``SentenceEncoder(name, **kwargs)`` as
``SentenceTransformer(name, **kwargs)`` (the same as ``from_pretrained``, its keywords translated, the
others refused by name)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, single_thread, st_model

from minisbert import SentenceEncoder

TEXTS = corpus(12, seed=5) + ["", "A man is playing guitar."]
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


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
    from minisbert.encoding.constructor import FROM_PRETRAINED

    parameters = list(inspect.signature(SentenceEncoder.from_pretrained).parameters)
    assert tuple(parameters[1:]) == FROM_PRETRAINED
