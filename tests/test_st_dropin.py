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
from conftest import add_dense, corpus, make_checkpoint, st_model

from minisbert import SentenceEncoder
from minisbert.errors import ConfigError
from minisbert.search import cos_sim

TOL = 1e-5
ARCHS = ["bert", "roberta", "deberta-v2"]
TEXTS = corpus(40, seed=11) + ["", "짧다", "A man is playing guitar."]


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max()) if a.size else 0.0


pytestmark = pytest.mark.usefixtures("one_thread_module")


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
        clone.rebuild_runner()  # the packed path copies fused weights: rebuilt after editing weights
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
    enc.rebuild_runner()
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


# ---------------------------------------------------------------------------------------------------
# precision=: quantized embeddings


def test_quantize_embeddings_is_sentence_transformers_bit_for_bit():
    from sentence_transformers.util import quantize_embeddings as st_quantize

    from minisbert.quantize import quantize_embeddings

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 37)).astype(np.float32)
    x[:, 3] = 0.25  # a zero-width dimension: step 1
    calib = rng.standard_normal((50, 37)).astype(np.float32)
    ranges = np.vstack([x.min(0) - 0.1, x.max(0) + 0.1])
    tokens = [rng.standard_normal((n, 37)).astype(np.float32) for n in (5, 1, 9)]
    cases = [(x, {}), (x[:20], {}), (x.astype(np.float16), {}), (x, {"ranges": ranges}),
             (x, {"calibration_embeddings": calib}), (torch.from_numpy(x).bfloat16(), {}), (list(x[:30]), {}),
             (list(torch.from_numpy(x[:30])), {}), (x[0], {"ranges": ranges}), (np.zeros((0, 37), np.float32), {})]
    for precision in ("float32", "int8", "uint8", "binary", "ubinary"):
        for value, kwargs in cases:
            want, got = st_quantize(value, precision, **kwargs), quantize_embeddings(value, precision, **kwargs)
            assert got.dtype == want.dtype and np.array_equal(got, want), (precision, kwargs)
        for kwargs in ({}, {"calibration_embeddings": calib}):  # token embeddings: ranges shared by all texts
            want, got = st_quantize(tokens, precision, **kwargs), quantize_embeddings(tokens, precision, **kwargs)
            assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want)), (precision, kwargs)
    for precision in ("int8", "uint8"):  # no ranges from one embedding, in both
        for fn in (st_quantize, quantize_embeddings):
            with pytest.raises(ValueError, match="single embedding"):
                fn(x[:1], precision)
    for fn in (st_quantize, quantize_embeddings):
        with pytest.raises(Exception, match="must be float"):
            fn(x.astype(np.int8), "int8")


PRECISIONS = ["int8", "uint8", "binary", "ubinary"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_encode_precision_equals_sentence_transformers(tiny, precision):
    """Quantized exactly as sentence-transformers quantizes our float embeddings; against its own encode,
    a value can land one step away only where its float sits within the fp32 tolerance of a bucket edge."""
    from sentence_transformers.util import quantize_embeddings as st_quantize

    enc, ref = SentenceEncoder.from_pretrained(tiny["bert"]), st_model(tiny["bert"])
    texts = corpus(120, seed=2)
    for kwargs in ({}, {"normalize_embeddings": True, "truncate_dim": 40}):
        floats = enc.encode(texts, **kwargs)
        got, want = enc.encode(texts, precision=precision, **kwargs), ref.encode(texts, precision=precision, **kwargs)
        assert got.dtype == want.dtype and got.shape == want.shape and len(texts) >= 100  # ranges from the data
        assert np.array_equal(got, st_quantize(floats, precision)), kwargs
        wrong = got != want
        if precision.endswith("binary"):
            assert not wrong.any(), f"{wrong.sum()} bits differ"
            continue
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        st_floats = ref.encode(texts, **kwargs)
        lo, hi = st_floats.min(0), st_floats.max(0)
        step = np.where(hi - lo == 0, 1, (hi - lo) / 255)
        position = (st_floats - lo) / step
        to_edge = np.abs(position - np.round(position)) * step
        assert (to_edge[wrong] <= 2 * TOL).all(), f"{wrong.sum()} values differ away from a bucket edge"
        assert wrong.mean() < 1e-3, f"{wrong.mean():.2%} of the values differ"
    # The outputs' types follow the conversions, as sentence-transformers'.
    for kwargs in ({"convert_to_tensor": True}, {"convert_to_numpy": False}):
        got, want = enc.encode(texts[:5], precision=precision, **kwargs), ref.encode(texts[:5], precision=precision,
                                                                                     **kwargs)
        assert type(got) is type(want) and [t.dtype for t in got] == [t.dtype for t in want], kwargs
    if precision.endswith("binary"):  # a single text: one vector (int8 cannot calibrate on one, below)
        assert np.array_equal(enc.encode(texts[0], precision=precision), ref.encode(texts[0], precision=precision))
    else:
        for model in (enc, ref):
            with pytest.raises(ValueError, match="single embedding"):
                model.encode(texts[0], precision=precision)


def test_encode_argument_errors_where_sentence_transformers_errors(minilm_path):
    enc, ref = SentenceEncoder.from_pretrained(minilm_path), st_model(minilm_path)
    for kwargs, match in (({"precision": "int4"}, "int4"), ({"output_value": "pooled"}, "pooled"),
                          ({"batch_size": 0}, "batch_size"), ({"unknown_option": 1}, "unknown_option"),
                          ({"prompt_name": "nope"}, "nope"), ({"output_value": None, "precision": "int8"}, None)):
        for model in (enc, ref):
            with pytest.raises((ValueError, KeyError), match=match):
                model.encode(TEXTS[:3], **kwargs)
    assert np.array_equal(enc.encode(TEXTS[:3], task="query"), enc.encode(TEXTS[:3]))  # Router tasks: one route
    assert np.array_equal(enc.encode(inputs=TEXTS[:3]), enc.encode(TEXTS[:3]))  # sentence-transformers 6's name


# ---------------------------------------------------------------------------------------------------
# output_value, conversions, empty input, dtypes


def test_output_values_equal_sentence_transformers(minilm_path):
    enc, ref = SentenceEncoder.from_pretrained(minilm_path), st_model(minilm_path)
    texts = TEXTS[:20]
    assert max_diff(enc.encode(texts, output_value="sentence_embedding"), ref.encode(texts)) <= TOL
    for kwargs in ({}, {"prompt": "query: ", "batch_size": 7}):
        got, want = (m.encode(texts, output_value="token_embeddings", **kwargs) for m in (enc, ref))
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert max_diff(g, w) <= TOL  # (tokens, 384): pads removed
    single = enc.encode(texts[1], output_value="token_embeddings")
    assert isinstance(single, torch.Tensor) and single.dim() == 2
    for kwargs in ({"prompt": "query: ", "batch_size": 6}, {"truncate_dim": 32, "normalize_embeddings": True}):
        got, want = (m.encode(texts, output_value=None, **kwargs) for m in (enc, ref))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert list(g) == list(w), kwargs  # the same features, in the same order
            for key in g:
                if isinstance(w[key], torch.Tensor) and not w[key].is_floating_point():
                    assert torch.equal(g[key], w[key]), key  # ids and masks padded as its batches are
                elif isinstance(w[key], torch.Tensor):
                    assert max_diff(g[key], w[key]) <= TOL, key
                else:
                    assert g[key] == w[key], key
    assert set(enc.encode(texts[0], output_value=None)) == set(ref.encode(texts[0], output_value=None))
    # Quantized token embeddings: ranges shared by all texts, as there.
    from sentence_transformers.util import quantize_embeddings as st_quantize
    tokens = enc.encode(texts, output_value="token_embeddings")
    got = enc.encode(texts, output_value="token_embeddings", precision="int8")
    assert all(np.array_equal(a, b) for a, b in zip(got, st_quantize(tokens, "int8")))


def test_conversions_and_empty_input_equal_sentence_transformers(minilm_path):
    enc, ref = SentenceEncoder.from_pretrained(minilm_path), st_model(minilm_path)
    for kwargs in ({}, {"convert_to_numpy": False}, {"convert_to_tensor": True},
                   {"output_value": "token_embeddings"}, {"output_value": None}, {"precision": "binary"},
                   {"convert_to_tensor": True, "precision": "ubinary"}):
        for texts in (TEXTS[:4], []):
            got, want = enc.encode(texts, **kwargs), ref.encode(texts, **kwargs)
            assert type(got) is type(want), (kwargs, texts)
            if isinstance(want, (np.ndarray, torch.Tensor)):
                assert got.shape == want.shape and got.dtype == want.dtype, (kwargs, texts)
            else:
                assert len(got) == len(want) and all(type(a) is type(b) for a, b in zip(got, want)), kwargs
    rows = enc.encode(TEXTS[:4], convert_to_numpy=False)
    assert max_diff(torch.stack(rows), ref.encode(TEXTS[:4])) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_return_their_dtype(tiny, dtype):
    """sentence-transformers returns the model's dtype: numpy float16, float32 for bfloat16 (numpy has
    none), a tensor in the dtype itself."""
    enc = SentenceEncoder.from_pretrained(tiny["bert"], dtype=dtype)
    ref = st_model(tiny["bert"]).to(dtype)
    got, want = enc.encode(TEXTS), ref.encode(TEXTS)
    assert got.dtype == want.dtype == (np.float16 if dtype == torch.float16 else np.float32)
    assert max_diff(got, want) <= 2e-2
    tensors = [m.encode(TEXTS[:3], convert_to_tensor=True) for m in (enc, ref)]
    assert tensors[0].dtype == tensors[1].dtype == dtype
    assert enc.encode(TEXTS[:3], normalize_embeddings=True, convert_to_tensor=True).dtype == dtype


def test_moves_and_dtype_names(tiny, tmp_path):
    path = tiny["roberta"]
    enc = SentenceEncoder.from_pretrained(path)
    fp32 = enc.encode(TEXTS)
    assert enc.to("cpu") is enc and enc.device == torch.device("cpu")
    for move, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16)):
        moved = getattr(SentenceEncoder.from_pretrained(path), move)()
        assert moved.dtype == dtype and all(p.dtype == dtype for p in moved.parameters())
        # The same weights cast: the same embeddings as loading in that dtype.
        fresh = SentenceEncoder.from_pretrained(path, dtype=str(dtype).removeprefix("torch."))
        assert max_diff(moved.encode(TEXTS), fresh.encode(TEXTS)) == 0.0, move
    enc.bfloat16().float()
    assert enc.dtype == torch.float32 and max_diff(enc.encode(TEXTS), fp32) > 0  # bf16 lost bits, as in torch
    assert max_diff(enc.to(torch.float32).encode(TEXTS, device="cpu"), enc.encode(TEXTS)) == 0.0
    # "auto": the dtype the checkpoint says it is in.
    half = SentenceEncoder.from_pretrained(path, dtype=torch.bfloat16)
    half.save(tmp_path / "bf16")
    assert SentenceEncoder.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert SentenceEncoder.from_pretrained(path, dtype="auto").dtype == torch.float32
    for bad in ("float8", "int8", torch.int64):
        with pytest.raises(ValueError, match="dtype"):
            SentenceEncoder.from_pretrained(path, dtype=bad)


def test_tokenize_equals_sentence_transformers(tiny, minilm_path):
    for path in (minilm_path, tiny["bert"], tiny["deberta-v2"]):
        enc, ref = SentenceEncoder.from_pretrained(path), st_model(path)
        texts = TEXTS + ["한국어 " * 300]
        got, want = enc.tokenize(texts), ref.tokenize(texts)
        assert list(got) == list(want), path
        for key, value in want.items():
            assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value, key
        assert got["input_ids"].shape[1] == enc.max_seq_length
    assert enc.tokenize([]) == ref.tokenize([]) == {}


# ---------------------------------------------------------------------------------------------------
# Constructor keywords, truncation context, similarity_pairwise


def test_constructor_keywords_equal_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = write_settings(make_checkpoint(tmp_path / "m", "bert"), default_prompt_name="passage", truncate_dim=48,
                            prompts={"query": "query: ", "passage": "passage: "})
    kwargs = {"prompts": {"query": "질문: ", "title": "title: "}, "default_prompt_name": "title", "truncate_dim": 40,
              "similarity_fn_name": "manhattan"}
    enc = SentenceEncoder.from_pretrained(folder, **kwargs)
    ref = SentenceTransformer(str(folder), device="cpu", **kwargs)
    assert enc.prompts == ref.prompts and enc.default_prompt_name == ref.default_prompt_name == "title"
    assert enc.truncate_dim == ref.truncate_dim == 40 and enc.similarity_fn_name == ref.similarity_fn_name
    assert max_diff(enc.encode(TEXTS), ref.encode(TEXTS)) <= TOL
    assert max_diff(enc.encode(TEXTS, prompt_name="passage"), ref.encode(TEXTS, prompt_name="passage")) <= TOL
    for model in (enc, ref):
        with model.truncate_sentence_embeddings(16):
            assert model.encode(TEXTS[:2]).shape == (2, 16) and model.get_sentence_embedding_dimension() == 16
        assert model.encode(TEXTS[:2]).shape == (2, 40)
    with pytest.raises(ValueError, match="nope"):
        SentenceTransformer(str(folder), device="cpu", default_prompt_name="nope")
    with pytest.raises(ValueError, match="nope"):
        SentenceEncoder.from_pretrained(folder, default_prompt_name="nope")
    for model in (enc, ref):
        with pytest.raises(ValueError, match="similarity_fn_name"):
            model.similarity_fn_name = "maxsim"


@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_pairwise_equals_sentence_transformers(tiny, name):
    enc = SentenceEncoder.from_pretrained(tiny["bert"], similarity_fn_name=name)
    ref = st_model(tiny["bert"])
    ref.similarity_fn_name = name
    a, b = enc.encode(TEXTS[:10]), enc.encode(TEXTS[10:20])
    for x, y in ((a, b), (torch.from_numpy(a).half(), b), (list(a), list(b)), (a[0], b[0])):
        got, want = enc.similarity_pairwise(x, y), ref.similarity_pairwise(x, y)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert torch.equal(enc.similarity(x, y), ref.similarity(x, y)), name


# ---------------------------------------------------------------------------------------------------
# semantic_search and paraphrase_mining


def test_semantic_search_and_paraphrase_mining_equal_sentence_transformers(tiny):
    from sentence_transformers import util

    from minisbert import search

    enc = SentenceEncoder.from_pretrained(tiny["bert"])
    corpus_texts, queries = corpus(150, seed=4), corpus(12, seed=9)
    docs, qs = enc.encode(corpus_texts, convert_to_tensor=True), enc.encode(queries, convert_to_tensor=True)
    for kwargs in ({}, {"top_k": 3, "query_chunk_size": 5, "corpus_chunk_size": 40}, {"top_k": 500}):
        for ours, theirs in ((search.cos_sim, util.cos_sim), (search.dot_score, util.dot_score)):
            got = search.semantic_search(qs, docs, score_function=ours, **kwargs)
            assert got == util.semantic_search(qs, docs, score_function=theirs, **kwargs), kwargs
    assert search.semantic_search(qs[0].numpy(), docs.numpy()) == util.semantic_search(qs[0].numpy(), docs.numpy())
    for kwargs in ({}, {"top_k": 2, "max_pairs": 30, "query_chunk_size": 17, "corpus_chunk_size": 50}):
        got = search.paraphrase_mining(enc, corpus_texts, **kwargs)
        assert got == util.paraphrase_mining_embeddings(docs, **kwargs), kwargs
        assert got == search.paraphrase_mining_embeddings(docs, **kwargs)
    ref = st_model(tiny["bert"])  # and on sentence-transformers' own embeddings: the same pairs
    want = util.paraphrase_mining(ref, corpus_texts, top_k=5)
    got = search.paraphrase_mining(enc, corpus_texts, top_k=5)
    # Pairs whose scores are closer than float32 noise (~3e-7) may come in either order, so the top pairs
    # are compared as a set, cut where the next score is clearly lower.
    cut = next(k for k in range(20, len(want)) if want[k - 1][0] - want[k][0] > 1e-5)
    assert {(i, j) for _, i, j in got[:cut]} == {(i, j) for _, i, j in want[:cut]}
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) <= TOL


# ---------------------------------------------------------------------------------------------------
# Pooling without the prompt; LayerNorm and WeightedLayerPooling; modules in any order after Pooling


def set_pooling(folder: Path, **values) -> Path:
    path = folder / "1_Pooling" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **values)), encoding="utf-8")
    return folder


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("max",), ("mean_sqrt_len_tokens",), ("weightedmean",),
                                   ("lasttoken",), ("cls", "weightedmean")])
def test_include_prompt_false_equals_sentence_transformers(tmp_path, modes):
    folder = set_pooling(make_checkpoint(tmp_path / "m", "bert", pooling=modes, max_seq_length=32),
                         include_prompt=False)
    ref = st_model(folder)
    want = {prompt: ref.encode(TEXTS, prompt=prompt) for prompt in ("질문: ", "", "아주 긴 지시문 " * 20)}
    for fast in (True, False):
        enc = SentenceEncoder.from_pretrained(folder, fast=fast)
        for prompt, expected in want.items():
            assert max_diff(enc.encode(TEXTS, prompt=prompt), expected) <= TOL, (prompt, fast)
    with_prompt = enc.encode(TEXTS, prompt="질문: ")
    enc.set_pooling_include_prompt(True)
    ref.set_pooling_include_prompt(True)
    assert max_diff(enc.encode(TEXTS, prompt="질문: "), ref.encode(TEXTS, prompt="질문: ")) <= TOL
    if modes != ("lasttoken",):  # the prompt is pooled again (the last token is never the prompt's)
        assert max_diff(enc.encode(TEXTS, prompt="질문: "), with_prompt) > 1e-3


def add_modules(folder: Path, after_pooling: list, before_pooling=None) -> Path:
    """Save sentence-transformers modules (its own classes) into ``folder`` around its Pooling."""
    modules = json.loads((folder / "modules.json").read_text())
    transformer, pooling = modules[0], modules[1]
    entries = [transformer]

    def add(module, kind):
        name = f"{len(entries)}_{kind}"
        (folder / name).mkdir()
        module.save(str(folder / name))
        entries.append({"idx": len(entries), "name": name, "path": name,
                        "type": f"sentence_transformers.models.{kind}"})

    if before_pooling is not None:
        add(before_pooling, "WeightedLayerPooling")
    entries.append(dict(pooling, idx=len(entries)))
    for module in after_pooling:
        add(module, type(module).__name__)
    (folder / "modules.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder


def st_modules():
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # before sentence-transformers 6
        from sentence_transformers import models as modules
    return modules


@pytest.mark.parametrize("hidden_states", [True, False])
def test_layer_norm_and_weighted_layer_pooling_equal_sentence_transformers(tmp_path, monkeypatch, hidden_states):
    """WeightedLayerPooling acts only when config.json says output_hidden_states, as in sentence-transformers."""
    from sentence_transformers.base.modules import Dense, Normalize

    modules = st_modules()
    torch.manual_seed(1)
    layer_pooling = modules.WeightedLayerPooling(64, num_hidden_layers=2, layer_start=1)
    norm = modules.LayerNorm(32)
    with torch.no_grad():
        layer_pooling.layer_weights.copy_(torch.tensor([0.3, 1.7]))
        norm.norm.weight.normal_(1, 0.3)
        norm.norm.bias.normal_(0, 0.3)
    folder = make_checkpoint(tmp_path / "m", "roberta", pooling="cls", config={"output_hidden_states": hidden_states})
    add_modules(folder, [Normalize(), Dense(64, 32), norm], before_pooling=layer_pooling)
    ref = st_model(folder)
    assert [type(m).__name__ for m in ref] == ["Transformer", "WeightedLayerPooling", "Pooling", "Normalize",
                                              "Dense", "LayerNorm"]
    want = ref.encode(TEXTS)
    for fast in (True, False):
        enc = SentenceEncoder.from_pretrained(folder, fast=fast)
        assert enc.fast == (fast and not hidden_states)  # every layer's states come from the reference forward
        assert max_diff(enc.encode(TEXTS), want) <= TOL, fast
    tokens = [m.encode(TEXTS[:5], output_value="token_embeddings") for m in (enc, ref)]
    assert all(max_diff(a, b) <= TOL for a, b in zip(*tokens))
    # Training would skip WeightedLayerPooling and leave LayerNorm untrained: refused, naming both.
    from minisbert import train
    (tmp_path / "pairs.tsv").write_text("a\tb\t0.5\nc\td\t1\n", encoding="utf-8")
    recipe = train.parse_recipe({"objectives": [{"data": str(tmp_path / "pairs.tsv"), "format": "scored-pairs",
                                                 "loss": "CosineSimilarityLoss", "batch_size": 2}], "fit": {}})
    with pytest.raises(ConfigError, match="training a model with WeightedLayerPooling, LayerNorm modules"):
        train.fit(enc, recipe, None, progress=False)
    # The layers are really weighted when active: other weights, other embeddings.
    with torch.no_grad():
        enc.layer_pooling.layer_weights.copy_(torch.tensor([1.0, 0.1]))
    assert (max_diff(enc.encode(TEXTS), want) > 1e-3) == hidden_states
    # Saved in the same layout, loaded by sentence-transformers with the (changed) weights.
    enc.save(tmp_path / "out")
    saved = st_model(tmp_path / "out")
    assert [type(m).__name__ for m in saved] == [type(m).__name__ for m in ref]
    assert max_diff(saved.encode(TEXTS), enc.encode(TEXTS)) <= TOL
    assert max_diff(SentenceEncoder.from_pretrained(tmp_path / "out").encode(TEXTS), enc.encode(TEXTS)) == 0.0
    # From the hub, their weights are fetched with the transformer's.
    from test_hub import FakeHub

    from minisbert.io import hub
    fake = FakeHub(tmp_path / "out", tmp_path / "fetched")
    monkeypatch.setattr(hub, "snapshot_download", fake)
    assert max_diff(SentenceEncoder.from_pretrained("org/saved").encode(TEXTS), enc.encode(TEXTS)) == 0.0
    assert {"1_WeightedLayerPooling/model.safetensors", "5_LayerNorm/model.safetensors"} <= fake.fetched
    # trace() pools what encode pools: the weighted layers when they are active.
    traced = torch.stack([t.sentence_embedding for t in enc.trace(TEXTS[:4])])
    assert max_diff(traced, enc.encode(TEXTS[:4])) <= TOL


# ---------------------------------------------------------------------------------------------------
# sentence-transformers' evaluators, called on a SentenceEncoder


def close_metrics(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= tol, f"{key}: {got[key]} vs {value}"


def test_sentence_transformers_evaluators_run_on_the_encoder(tiny, tmp_path):
    from sentence_transformers.evaluation import (
        BinaryClassificationEvaluator,
        EmbeddingSimilarityEvaluator,
        InformationRetrievalEvaluator,
    )

    enc, ref = SentenceEncoder.from_pretrained(tiny["roberta"]), st_model(tiny["roberta"])
    texts = corpus(80, seed=6)
    rng = np.random.default_rng(0)
    s1, s2 = texts[:40], texts[40:]
    scores = rng.random(40).tolist()
    # Spearman's figure moves if two pairs' cosines swap: the pairs are 1.5e-5 apart at the closest,
    # against float32 noise of ~3e-7 between the two encoders.
    pair_cos = np.diag(cos_sim(ref.encode(s1), ref.encode(s2)).numpy())
    assert np.diff(np.sort(pair_cos)).min() > 1e-5
    for kwargs in ({}, {"precision": "int8"}, {"precision": "binary", "truncate_dim": 48},
                   {"similarity_fn_names": ["cosine", "dot", "euclidean", "manhattan"]}):
        evaluator = EmbeddingSimilarityEvaluator(s1, s2, scores, name="sts", **kwargs)
        got, want = evaluator(enc), evaluator(ref)
        close_metrics(got, want, 1e-3 if "precision" in kwargs else 1e-5)
    labels = (rng.random(40) > 0.5).astype(int).tolist()
    evaluator = BinaryClassificationEvaluator(s1, s2, labels, name="pairs")
    close_metrics(evaluator(enc), evaluator(ref), 1e-5)
    # Retrieval metrics are functions of ranks alone, so they are equal only where no two documents'
    # scores are closer than float32 noise (~1e-6 here): on this random model 700 cosines share
    # 0.88-1.0, adjacent ones can be 4e-7 apart, and a CI machine's kernels once swapped such a pair.
    # Each query's relevant documents are therefore picked where the reference's ranking has a margin.
    queries = {f"q{i}": t for i, t in enumerate(texts[:10])}
    docs = {f"d{i}": t for i, t in enumerate(texts[5:75])}
    sims = cos_sim(ref.encode(texts[:10]), ref.encode(texts[5:75])).numpy()  # (10, 70)
    relevant = {}
    for i, row in enumerate(sims):
        order = np.argsort(-row)
        gap = np.minimum(np.abs(row[order] - np.roll(row[order], 1)), np.abs(row[order] - np.roll(row[order], -1)))
        ranks = [r for r in range(1, 69) if gap[r] > 1e-4]  # rank 0 is the query itself for q5..q9
        relevant[f"q{i}"] = {f"d{order[r]}" for r in (ranks[i % 4], ranks[len(ranks) // 2 + i])}
    evaluator = InformationRetrievalEvaluator(queries, docs, relevant, name="ir")
    got = evaluator(enc)
    assert got == evaluator(ref)
    assert 0.05 < got["ir_cosine_ndcg@10"] < 1.0  # relevant documents both inside and outside the top 10
    # model.evaluate, and the metrics left in model_card_data as sentence-transformers' trainer reads them.
    assert enc.evaluate(evaluator, output_path=str(tmp_path / "eval")) == got
    assert (tmp_path / "eval" / evaluator.csv_file).is_file()
    assert enc.model_card_data.eval_results[-1]["metrics"] == evaluator(enc)
