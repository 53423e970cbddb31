"""sentence-transformers as a drop-in: the same call on ``SentenceTransformer`` and ``SentenceEncoder``,
compared (fp32 embeddings <= 1e-5, quantized outputs exactly equal, errors where sentence-transformers
errors). Copying and pickling, ``save``, the rest of ``encode``'s surface, the search helpers."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, single_thread, st_model

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
