"""The losses of issue 28 against sentence-transformers 6.3's classes: on the same embeddings (float64,
loss and gradients), on a tiny model's parameters (the first-step test's float32 bounds, ``test_train``),
gradient caching against the uncached loss, and a short old_fit run per loss family (slow)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, single_thread
from test_train import ARCHS, NO_DROPOUT, hf_names, relative, st_loaders

from minisbert import train
from minisbert.encoder import SentenceEncoder
from minisbert.train import loop
from minisbert.train.data import Examples
from minisbert.train.losses import (
    angle_loss,
    cosent_loss,
    get_loss,
    gist_embed_loss,
    matryoshka_loss,
    multiple_negatives_symmetric_ranking_loss,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("losses")
    return {arch: make_checkpoint(root / arch, arch, config=NO_DROPOUT) for arch in ARCHS}


@pytest.fixture(scope="module")
def tiny(checkpoints) -> Path:
    return checkpoints["bert"]


def leaves(columns: int, rows: int = 6, width: int = 16, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(rows, width, dtype=torch.float64, requires_grad=True) for _ in range(columns)]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    assert abs(ours.item() - theirs.item()) <= 1e-12 * abs(theirs.item()), (ours.item(), theirs.item())
    for a, b in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------------
# On the same embeddings


@pytest.mark.parametrize("columns", [2, 3, 4])
def test_symmetric_mnr_equals_sentence_transformers(columns):
    from sentence_transformers import losses

    e = leaves(columns, seed=columns)
    ours = multiple_negatives_symmetric_ranking_loss(e, None, scale=20.0)
    theirs = losses.MultipleNegativesSymmetricRankingLoss(None).compute_loss_from_embeddings(e, None)
    assert_same(ours, theirs, e)


@pytest.mark.parametrize("name", ["CoSENTLoss", "AnglELoss"])
@pytest.mark.parametrize("width", [16, 15])  # AnglE pads an odd width
def test_ranked_pairs_losses_equal_sentence_transformers(name, width):
    from sentence_transformers import losses

    e = leaves(2, rows=9, width=width)
    labels = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0, 0.3, 0.3, 1.0, 0.7], dtype=torch.float64)  # ties too
    ours = {"CoSENTLoss": cosent_loss, "AnglELoss": angle_loss}[name](e, labels, scale=20.0)
    theirs = getattr(losses, name)(None, scale=20.0).compute_loss_from_embeddings(e, labels)
    assert_same(ours, theirs, e)


class Guide:
    """A stand-in for sentence-transformers' guide model: GISTEmbedLoss embeds through it."""


def st_gist(embeddings, guide_embeddings, **params):
    """sentence-transformers' GISTEmbedLoss.forward with its two embedding calls answered by the given
    tensors (its class wants real models with transformers tokenizers; the math is what is compared)."""
    from sentence_transformers.sentence_transformer.losses import gist_embed

    loss = gist_embed.GISTEmbedLoss.__new__(gist_embed.GISTEmbedLoss)
    torch.nn.Module.__init__(loss)
    loss.model, loss.guide, loss.must_retokenize = object(), object(), False
    loss.temperature, loss.similarity_fct = params.get("temperature", 0.01), torch.nn.CosineSimilarity(dim=-1)
    loss.margin_strategy, loss.margin = params.get("margin_strategy", "absolute"), params.get("margin", 0.0)
    loss.contrast_anchors = params.get("contrast_anchors", True)
    loss.contrast_positives = params.get("contrast_positives", True)
    loss.gather_across_devices, loss.cross_entropy_loss = False, torch.nn.CrossEntropyLoss()
    original = gist_embed.embed_columns
    gist_embed.embed_columns = lambda model, features: embeddings if model is loss.model else guide_embeddings
    try:
        return loss.forward([{} for _ in embeddings], None)
    finally:
        gist_embed.embed_columns = original


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("params", [{}, {"margin_strategy": "absolute", "margin": 0.1},
                                    {"margin_strategy": "relative", "margin": 0.05, "temperature": 0.05},
                                    {"contrast_anchors": False, "contrast_positives": False}])
def test_gist_equals_sentence_transformers(columns, params):
    """The guide: the embeddings plus noise, so that some in-batch candidates are masked and some not."""
    e = leaves(columns, rows=8, seed=columns)
    g = [(x + 0.8 * torch.randn_like(x)).detach() for x in e]
    g[1][3] = g[0][5]  # a false negative the guide sees: positive 3 is anchor 5's text
    ours = gist_embed_loss(e, None, guide_embeddings=g, **params)
    theirs = st_gist(e, g, **params)
    assert torch.isfinite(ours)
    assert_same(ours, theirs, e)


@pytest.mark.parametrize("n_dims_per_step", [-1, 2])
def test_matryoshka_equals_sentence_transformers(n_dims_per_step):
    """MatryoshkaLoss over MNR and CoSENT: the weighted sum of the inner loss on shrunk embeddings, as
    sentence-transformers' (its ``shrink``, its dims sorted largest first, its ``random.sample``)."""
    from sentence_transformers import losses
    from sentence_transformers.sentence_transformer.losses.matryoshka import shrink

    for inner, st_inner, labels in [
            ({"loss": "MultipleNegativesRankingLoss"}, losses.MultipleNegativesRankingLoss(None), None),
            ({"loss": "CoSENTLoss"}, losses.CoSENTLoss(None), torch.rand(6, dtype=torch.float64))]:
        spec, params = get_loss("MatryoshkaLoss", {"loss": inner, "matryoshka_dims": [4, 16, 8],
                                                   "matryoshka_weights": [0.5, 1, 2],
                                                   "n_dims_per_step": n_dims_per_step})
        e = leaves(2)
        ours = matryoshka_loss(e, labels, **params, rng=random.Random(3))
        random.seed(3)
        dims, weights = (16, 8, 4), (1, 2, 0.5)
        indices = range(3) if n_dims_per_step < 0 else sorted(random.sample(range(3), n_dims_per_step))
        theirs = sum(weights[i] * st_inner.compute_loss_from_embeddings([shrink(x, dims[i]) for x in e], labels)
                     for i in indices)
        assert_same(ours, theirs, e)


def test_loss_params_are_checked():
    with pytest.raises(ValueError, match="guide must name"):
        get_loss("GISTEmbedLoss", {})
    with pytest.raises(ValueError, match="margin_strategy"):
        get_loss("CachedGISTEmbedLoss", {"guide": "m", "margin_strategy": "percent"})
    with pytest.raises(ValueError, match="mini_batch_size"):
        get_loss("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 0})
    with pytest.raises(ValueError, match="inner loss cannot be MatryoshkaLoss"):
        get_loss("MatryoshkaLoss", {"loss": {"loss": "MatryoshkaLoss", "loss_params": {}}, "matryoshka_dims": [8]})
    loss, params = get_loss("MatryoshkaLoss", {"loss": {"loss": "CachedGISTEmbedLoss",
                                                        "loss_params": {"guide": "g", "mini_batch_size": 4}},
                                               "matryoshka_dims": [8, 32]})
    assert loss.cached and loss.guided and not loss.scored and params["matryoshka_dims"] == (32, 8)


# ---------------------------------------------------------------------------------------------------
# On a tiny model's parameters, against sentence-transformers' loss objects


TEXTS = [t.replace("\t", " ") for t in corpus(60, seed=4)]


def examples(columns: int, n: int = 8, scored: bool = False) -> Examples:
    rows = [tuple(TEXTS[columns * i + k] for k in range(columns)) for i in range(n)]
    return Examples(rows, [((i * 7) % 10) / 10 for i in range(n)] if scored else None)


def st_loss(st, guide, name: str, params: dict):
    """sentence-transformers' loss object for a recipe's ``loss`` and ``loss_params``."""
    from sentence_transformers import losses

    params = dict(params)
    if name == "MatryoshkaLoss":
        inner = params.pop("loss")
        return losses.MatryoshkaLoss(st, st_loss(st, guide, inner["loss"], inner.get("loss_params", {})), **params)
    if "guide" in params:
        params["guide"] = guide
    return getattr(losses, name)(st, **params)


def our_gradients(path: Path, name: str, params: dict, ex: Examples):
    loss, checked = get_loss(name, params)
    ours = SentenceEncoder.from_pretrained(path)
    guide = SentenceEncoder.from_pretrained(path) if loss.guided else None
    mini = loop.loop_param(checked, "mini_batch_size") or (32 if loss.cached else None)
    task = loop.Task(ex, None, loss.fn, loop.call_params(checked), guide, mini)
    batch = list(range(len(ex)))
    with ours.mode(train=True):
        if task.mini_batch_size is not None:
            value = loop.cached_loss(ours, task, batch, None, 1.0, random.Random(0))
        else:
            value = loop.batch_loss(ours, task, batch, random.Random(0))
            value.backward()
    return ours, value.item(), {n: p.grad for n, p in ours.model.named_parameters()}


def st_gradients(path: Path, name: str, params: dict, ex: Examples, dtype=torch.float32):
    from sentence_transformers import InputExample, SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu").to(dtype).train()
    guide = SentenceTransformer(str(path), device="cpu").to(dtype) if "guide" in str(params) else None
    features, labels = st.smart_batching_collate(
        [InputExample(texts=list(t), label=ex.scores[i] if ex.scores else 0) for i, t in enumerate(ex.texts)])
    value = st_loss(st, guide, name, params)(features, labels)
    value.backward()
    return value.item(), {n.removeprefix("0.model."): p.grad for n, p in st.named_parameters() if p.grad is not None}


MODEL_CASES = {
    "cached-mnr": ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 3}, 3, False),
    "symmetric": ("MultipleNegativesSymmetricRankingLoss", {}, 2, False),
    "gist": ("GISTEmbedLoss", {"guide": "GUIDE", "temperature": 0.05}, 3, False),
    "cached-gist": ("CachedGISTEmbedLoss", {"guide": "GUIDE", "mini_batch_size": 3, "temperature": 0.05}, 2, False),
    "matryoshka-mnr": ("MatryoshkaLoss", {"loss": {"loss": "MultipleNegativesRankingLoss"},
                                          "matryoshka_dims": [32, 16, 8]}, 3, False),
    "matryoshka-cached": ("MatryoshkaLoss", {"loss": {"loss": "CachedMultipleNegativesRankingLoss",
                                                      "loss_params": {"mini_batch_size": 5}},
                                             "matryoshka_dims": [32, 8], "matryoshka_weights": [1, 0.5]}, 2, False),
    "cosent": ("CoSENTLoss", {}, 2, True),
    "angle": ("AnglELoss", {}, 2, True),
}


def with_guide(params: dict, path: Path) -> dict:
    """The placeholder GUIDE replaced by the tiny model's folder, at any depth."""
    if isinstance(params, dict):
        return {k: (str(path) if v == "GUIDE" else with_guide(v, path)) for k, v in params.items()}
    return params


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_gradients_equal_sentence_transformers(checkpoints, arch, case):
    """Loss within 1e-5 and every parameter's gradient within the first-step test's bounds (2x
    old_fit's own float32 distance to its float64 gradients, or 1e-5), the guide the model itself."""
    tiny = checkpoints[arch]
    name, params, columns, scored = MODEL_CASES[case]
    params = with_guide(params, tiny)
    ex = examples(columns, scored=scored)
    with single_thread():
        ours, value, grads = our_gradients(tiny, name, params, ex)
        st_value, st_grads = st_gradients(tiny, name, params, ex)
        _, truth = st_gradients(tiny, name, params, ex, torch.float64)
    assert abs(value - st_value) <= 1e-5 * abs(st_value), (value, st_value)
    names = hf_names(tiny, ours)
    for n, g in grads.items():
        if n.endswith("attn.key.bias") and arch != "deberta-v2":  # zero in exact arithmetic (test_train)
            continue
        st_error, ours_error = relative(st_grads[names[n]], truth[names[n]]), relative(g, truth[names[n]])
        assert ours_error <= max(1e-5, 2 * st_error), f"{n}: {ours_error:.2e} vs old_fit's {st_error:.2e}"


def test_cached_gradients_equal_uncached(tiny):
    """CachedMNR with mini-batches of 3 against MNR on the same batch of 8 triplets: the same gradients
    (sums in another order), and a second backward through the same random state (dropout on here)."""
    ex = examples(3)
    noisy = make_checkpoint(tiny.parent / "noisy", "bert")  # transformers' dropout, 0.1
    with single_thread():
        grads = []
        for name, params in [("MultipleNegativesRankingLoss", {}),
                             ("CachedMultipleNegativesRankingLoss", {"mini_batch_size": 3})]:
            torch.manual_seed(0)
            _, _, g = our_gradients(tiny, name, params, ex)
            grads.append(g)
        for n in grads[0]:
            if not n.endswith("attn.key.bias"):
                assert relative(grads[1][n], grads[0][n]) <= 1e-4, n
    # Dropout on: the second pass must replay the first pass's masks. The uncached loss with each column
    # embedded in its own call from the same seed draws the same masks the cached first pass draws.
    from minisbert.train.losses import multiple_negatives_ranking_loss
    ex = examples(2)
    with single_thread():
        torch.manual_seed(1)
        cached = our_gradients(noisy, "CachedMultipleNegativesRankingLoss", {"mini_batch_size": 8}, ex)[2]
        plain = SentenceEncoder.from_pretrained(noisy)
        torch.manual_seed(1)
        with plain.mode(train=True):
            columns = [plain.embed_for_training([t[k] for t in ex.texts]) for k in range(2)]
            multiple_negatives_ranking_loss(columns).backward()
    for n, p in plain.model.named_parameters():
        if not n.endswith("attn.key.bias"):
            assert relative(cached[n], p.grad) <= 1e-4, n


# ---------------------------------------------------------------------------------------------------
# A short old_fit run per loss family


def run_old_fit(path: Path, name: str, params: dict, ex: Examples, steps_recipe: dict):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    guide = SentenceTransformer(str(path), device="cpu") if "guide" in str(params) else None
    record = []
    loss = st_loss(st, guide, name, params)
    original = loss.forward

    def forward(features, labels):
        value = original(features, labels)
        record.append(value.item())
        return value

    loss.forward = forward
    st.old_fit([(st_loaders([ex])[0], loss)], epochs=2, scheduler="WarmupLinear", warmup_steps=3,
               optimizer_params={"lr": 1e-3}, weight_decay=0.01, max_grad_norm=1, show_progress_bar=False)
    return st, np.array(record)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cached-mnr", "symmetric", "gist", "cached-gist", "matryoshka-mnr", "cosent",
                                  "angle"])
def test_steps_equal_old_fit(tiny, tmp_path, case):
    """16 steps (2 epochs of 8 batches of 8) through fit and old_fit with each loss: the step-parity
    bounds of test_train (losses 1e-4 relative, update and embeddings 5e-3)."""
    name, params, columns, scored = MODEL_CASES[case]
    params = with_guide(params, tiny)
    ex = examples(columns, n=64, scored=scored) if len(TEXTS) >= 64 * columns else None
    if ex is None:
        texts = [t.replace("\t", " ") for t in corpus(64 * columns + 8, seed=6)]
        rows = [tuple(texts[columns * i + k] for k in range(columns)) for i in range(64)]
        ex = Examples(rows, [((i * 7) % 10) / 10 for i in range(64)] if scored else None)
    data = tmp_path / "data.jsonl"
    import json
    names = ["anchor", "positive", "negative"][:columns] if not scored else ["sentence1", "sentence2"]
    with open(data, "w", encoding="utf-8") as f:
        for i, t in enumerate(ex.texts):
            row = dict(zip(names, t))
            if scored:
                row["score"] = ex.scores[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    rec = train.parse_recipe({"objectives": [{"data": str(data), "format": "dataset", "loss": name,
                                              "loss_params": params, "batch_size": 8}],
                              "fit": {"epochs": 2, "warmup_steps": 3, "optimizer_params": {"lr": 1e-3}}, "seed": 0})
    probe = corpus(24, seed=11)
    with single_thread():
        ours = SentenceEncoder.from_pretrained(tiny)
        result = train.fit(ours, rec, None, progress=False)
        st, record = run_old_fit(tiny, name, params, ex, {})
        emb_ours, emb_st = ours.encode(probe), st.encode(probe)
    losses = np.array([r["loss"] for r in result.losses])
    assert len(losses) == len(record) == 16
    rel = np.abs(losses - record) / np.abs(record)
    diff = float(np.abs(emb_ours - emb_st).max())
    print(f"\n{case}: loss rel max {rel.max():.2e}, embeddings {diff:.2e}")
    assert rel.max() <= 1e-4, rel
    assert diff <= 5e-3


def test_cached_loss_under_a_loss_scaler(tiny, tmp_path, monkeypatch):
    """fp16 AMP's loss scaling (a CPU GradScaler in its place, as test_train's scaler test): the cached
    loss scales its embeddings' gradients by the scaler's factor, so a steady scale gives float32's run
    bit for bit (a power of two scales exactly; clipping sees the unscaled gradients)."""
    import json

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(dict(zip(("anchor", "positive", "negative"), t))) + "\n"
                            for t in examples(3, n=16).texts), encoding="utf-8")
    rec = train.parse_recipe({"objectives": [{"data": str(data), "format": "dataset", "batch_size": 8,
                                              "loss": "CachedMultipleNegativesRankingLoss",
                                              "loss_params": {"mini_batch_size": 3}}],
                              "fit": {"epochs": 2, "warmup_steps": 1, "optimizer_params": {"lr": 1e-3}}})
    with single_thread():
        a, b = SentenceEncoder.from_pretrained(tiny), SentenceEncoder.from_pretrained(tiny)
        fp32 = train.fit(a, rec, None, progress=False)
        monkeypatch.setattr(loop, "precision", lambda use_amp, device: (
            None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6)))
        scaled = train.fit(b, rec, None, progress=False)
    assert scaled.losses == fp32.losses
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
