"""Training: ``minisbert.train.loop`` against sentence-transformers' ``SentenceTransformer.old_fit`` (the legacy
fit that trained the seed models), step for step, on tiny BERT, RoBERTa and DeBERTa-v2 checkpoints; the
losses against sentence-transformers' loss classes; recipes, data readers and samplers.

Why the multi-step tests are not bitwise: the two sides compute the same sums in other orders (texts
grouped by length here, padded per column there; fused attention kernels; pooling as a GEMV), so the
first step's gradients differ by ~1e-6 relative. AdamW divides each gradient entry by its own running
RMS: entries that are rounding noise on both sides (sums of large cancelling terms, and a key bias,
whose gradient is zero in exact arithmetic because softmax ignores a per-query constant) become whole
``lr``-sized steps in different directions. Measured: perturbing old_fit's own gradients by 1e-6
(relative, random) moves its per-step losses by up to ~3e-4 relative after 16 steps at lr 1e-3, its
weights' update by 0.06-0.1% and its embeddings by ~1e-3. The tests hold minisbert to bounds of that size.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, corpus, make_checkpoint, require_shared_data, single_thread

from minisbert import train
from minisbert.encoder import SentenceEncoder
from minisbert.errors import DataFormatError
from minisbert.fast.cpu import cpu_kind
from minisbert.io.weights import map_state_dict, read_state_dict
from minisbert.train import loop, optim
from minisbert.train.data import Examples, Sampler, read_examples
from minisbert.train.logs import Progress
from minisbert.train.losses import cosine_similarity_loss, get_loss, multiple_negatives_ranking_loss

ARCHS = ["bert", "roberta", "deberta-v2"]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def shared_data(relative: str) -> Path:
    """A file of the shared data (KorSTS, KorNLI); the test skips, naming it, when it is absent or hidden."""
    return require_shared_data(relative)


# ---------------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints without dropout, and training files


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    return {arch: make_checkpoint(root / arch, arch, config=NO_DROPOUT) for arch in ARCHS}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_files(tmp_path_factory.mktemp("data"))


def write_files(root: Path) -> dict[str, Path]:
    """64 triplets and 64 scored pairs of Korean texts (KorSTS's when present), tab-separated."""
    texts = [t.replace("\t", " ") for t in corpus(200, seed=3)]
    rng = random.Random(0)
    triplets = root / "triplets.tsv"
    triplets.write_text("".join(f"{texts[3 * i]}\t{texts[3 * i + 1]}\t{texts[3 * i + 2]}\n" for i in range(64)),
                        encoding="utf-8")
    scored = root / "scored.tsv"
    scored.write_text("".join(f"{texts[2 * i + 1]}\t{texts[2 * i + 4]}\t{rng.randint(0, 25) / 25}\n"
                              for i in range(64)), encoding="utf-8")
    return {"triplets": triplets, "scored-pairs": scored}


MNR = {"format": "triplets", "loss": "MultipleNegativesRankingLoss",
       "loss_params": {"scale": 20.0, "similarity_fct": "cos_sim"}}
COSINE = {"format": "scored-pairs", "loss": "CosineSimilarityLoss"}


def recipe(files, objectives: list[dict], **fit) -> train.Recipe:
    """Objectives with the sequential sampler and batch 8; fit parameters as old_fit's call below."""
    objs = [dict(o, data=str(files[o["format"]]), batch_size=8, sampler="sequential") for o in objectives]
    fit = {"epochs": 2, "scheduler": "WarmupLinear", "warmup_steps": 3, "optimizer_params": {"lr": 1e-3},
           "weight_decay": 0.01, "max_grad_norm": 1, **fit}
    return train.parse_recipe({"objectives": objs, "fit": fit, "seed": 0})


# ---------------------------------------------------------------------------------------------------
# The sentence-transformers side


def st_losses(st, objectives: list[dict], record: list[float]):
    """sentence-transformers' loss objects for ``objectives``, each appending its value to ``record``."""
    from sentence_transformers import losses

    class Recorded:
        def forward(self, features, labels):
            value = super().forward(features, labels)
            record.append(value.item())
            return value

    class MNRLoss(Recorded, losses.MultipleNegativesRankingLoss):
        pass

    class CosineLoss(Recorded, losses.CosineSimilarityLoss):
        pass

    out = []
    for o in objectives:
        if o["loss"] == "MultipleNegativesRankingLoss":
            from sentence_transformers.util import cos_sim, dot_score
            fct = {"cos_sim": cos_sim, "dot_score": dot_score}[o["loss_params"]["similarity_fct"]]
            out.append(MNRLoss(st, scale=o["loss_params"]["scale"], similarity_fct=fct))
        else:
            out.append(CosineLoss(st))
    return out


def st_loaders(examples: list[Examples], batch_size: int = 8):
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    loaders = []
    for ex in examples:
        items = [InputExample(texts=list(t), label=ex.scores[i] if ex.scores is not None else 0)
                 for i, t in enumerate(ex.texts)]
        loaders.append(DataLoader(items, batch_size=batch_size, shuffle=False))  # the sequential sampler
    return loaders


def hf_names(path: Path, encoder: SentenceEncoder) -> dict[str, str]:
    """Our parameter name -> the checkpoint's key (the name inside sentence-transformers' ``0.model.``)."""
    sources: dict[str, str] = {}
    map_state_dict(read_state_dict(path / "model.safetensors"), encoder.arch, encoder.model, str(path),
                   sources=sources)
    return sources


def old_fit(path: Path, rec, objectives: list[dict], dtype=torch.float32):
    """``rec`` through sentence-transformers' old_fit in ``dtype``: (the trained model, per-step losses)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu").to(dtype)
    record: list[float] = []
    examples = [read_examples(list(o.data), o.format, random.Random(0)) for o in rec.objectives]
    st.old_fit(list(zip(st_loaders(examples), st_losses(st, objectives, record))), epochs=rec.fit.epochs,
               scheduler="WarmupLinear", warmup_steps=rec.fit.warmup_steps, optimizer_params={"lr": 1e-3},
               weight_decay=0.01, max_grad_norm=1, show_progress_bar=False)
    return st, np.array(record)


def run_both(path: Path, files, objectives: list[dict], **fit) -> dict:
    """The same recipe through minisbert's fit and old_fit: per-step losses, updates, embeddings."""
    rec = recipe(files, objectives, **fit)
    probe = corpus(24, seed=11)
    with single_thread():
        ours = SentenceEncoder.from_pretrained(path)
        names = hf_names(path, ours)
        before = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
        result = train.fit(ours, rec, None, progress=False)
        ours_after = {n: p.detach().clone() for n, p in ours.model.named_parameters()}

        st, record = old_fit(path, rec, objectives)
        st_params = dict(st.named_parameters())
        st_after = {n: st_params["0.model." + names[n]].detach().clone() for n in before}
        emb_ours, emb_st = ours.encode(probe), st.encode(probe)
    ours_update = torch.cat([(ours_after[n] - before[n]).flatten() for n in before])
    st_update = torch.cat([(st_after[n] - before[n]).flatten() for n in before])
    return {"ours": np.array([r["loss"] for r in result.losses]), "st": record, "recipe": rec,
            "update": ((ours_update - st_update).norm() / st_update.norm()).item(),
            "embeddings": float(np.abs(emb_ours - emb_st).max())}


# ---------------------------------------------------------------------------------------------------
# Data readers and samplers


def test_plain_tsv_readers(tmp_path):
    (tmp_path / "t.tsv").write_text("a\tb\tc\n\nd\te\tf\n", encoding="utf-8")
    (tmp_path / "s.tsv").write_text('a "quoted\tb\t0.25\n', encoding="utf-8")  # QUOTE_NONE: quotes are text
    triplets = read_examples([tmp_path / "t.tsv"], "triplets", random.Random(0))
    assert triplets.texts == [("a", "b", "c"), ("d", "e", "f")] and triplets.scores is None
    scored = read_examples([tmp_path / "s.tsv"], "scored-pairs", random.Random(0))
    assert scored.texts == [('a "quoted', "b")] and scored.scores == [0.25]
    with pytest.raises(DataFormatError, match=r"t.tsv:1: 3 tab-separated fields, expected 2"):
        read_examples([tmp_path / "t.tsv"], "pairs", random.Random(0))
    (tmp_path / "bad.tsv").write_text("a\tb\t5\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad.tsv:1: score '5' is not a number in \[0, 1\]"):
        read_examples([tmp_path / "bad.tsv"], "scored-pairs", random.Random(0))


def test_kornli_triplets(tmp_path):
    """A sentence with both an entailed and a contradicted partner (either side of a pair) gives two
    triplets, [s, entailed, contradicted] and [entailed, s, contradicted], as the NLI example builds them."""
    (tmp_path / "nli.tsv").write_text(
        "sentence1\tsentence2\tgold_label\n P \tE\tentailment\nP\tC\tcontradiction\nP\tN\tneutral\n"
        "Q\tE\tcontradiction\n", encoding="utf-8")
    examples = read_examples([tmp_path / "nli.tsv"], "kornli", random.Random(0))
    # P: entailed E, contradicted C. E: entailed P, contradicted Q (E read as premise of the reversed pairs).
    assert examples.texts == [("P", "E", "C"), ("E", "P", "C"), ("E", "P", "Q"), ("P", "E", "Q")]
    assert examples.scores is None


def test_korsts_and_kornli_files():
    korsts = read_examples([require_shared_data("korsts/sts-train.tsv")], "korsts", random.Random(0))
    assert len(korsts) == 5749 and korsts.scores[0] == 1.0 and korsts.scores[1] == pytest.approx(3.8 / 5)
    files = [require_shared_data("kornli/xnli.dev.ko.tsv"), require_shared_data("kornli/xnli.test.ko.tsv")]
    nli = read_examples(files, "kornli", random.Random(0))
    pairs = {"entailment": set(), "contradiction": set()}
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines()[1:]:
            s1, s2, label = line.split("\t")
            pairs.setdefault(label, set()).add(frozenset((s1.strip(), s2.strip())))
    assert len(nli) > 4000
    for a, p, n in nli.texts:  # [s, entailed, contradicted] or [entailed, s, contradicted]
        assert frozenset((a, p)) in pairs["entailment"]
        assert frozenset((a, n)) in pairs["contradiction"] or frozenset((p, n)) in pairs["contradiction"]


def test_sequential_and_shuffle_samplers():
    examples = Examples([(str(i), str(i)) for i in range(10)])
    sequential = Sampler(examples, 4, "sequential", random.Random(0))
    stream = iter(sequential)
    assert len(sequential) == 3  # the last, smaller batch is kept, as a DataLoader does
    assert [next(stream) for _ in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]
    shuffle = iter(Sampler(examples, 4, "shuffle", random.Random(0)))
    passes = [sum((next(shuffle) for _ in range(3)), []) for _ in range(2)]
    assert all(sorted(p) == list(range(10)) for p in passes) and passes[0] != passes[1]


def test_no_duplicates_sampler_equals_sentence_transformers():
    """The same batches as NoDuplicatesDataLoader given the same random state, across reshuffles."""
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.datasets.no_duplicates_dataloader import NoDuplicatesDataLoader

    texts = [(f"s{i % 11}", f"t{i}", f" S{(i * 3) % 13} ") for i in range(23)]  # repeats, case and spaces
    ours = Sampler(Examples(texts), 4, "no_duplicates", random.Random(5))
    random.seed(5)
    theirs = NoDuplicatesDataLoader([InputExample(texts=list(t)) for t in texts], batch_size=4)
    assert len(ours) == len(theirs) == 5
    stream, expected = iter(ours), []
    for _ in range(4):  # old_fit calls iter() again after each pass; the loader's pointer carries on
        expected += [[tuple(e.texts) for e in batch] for batch in theirs]
    got = [[texts[i] for i in next(stream)] for _ in range(len(expected))]
    assert got == expected
    for batch in got:  # no text of one example in another example of its batch (one example may repeat itself)
        keys = [{t.strip().lower() for t in example} for example in batch]
        assert sum(map(len, keys)) == len(set().union(*keys))
    with pytest.raises(DataFormatError, match="without a text twice"):
        next(iter(Sampler(Examples([("a", "b")] * 5), 2, "no_duplicates", random.Random(0))))


# ---------------------------------------------------------------------------------------------------
# Recipes


def write_tsv(path: Path, rows: list[str]) -> str:
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_recipe_errors_name_the_key(tmp_path):
    data = write_tsv(tmp_path / "p.tsv", ["a\tb\t0.5"])
    good = {"objectives": [{"data": data, "format": "scored-pairs", "loss": "CosineSimilarityLoss", "batch_size": 2}],
            "fit": {"epochs": 1}}
    assert train.parse_recipe(good).fit.scheduler == "warmuplinear"

    def error(**changes) -> str:
        raw = json.loads(json.dumps(good))
        for key, value in changes.items():
            target = raw["objectives"][0] if key in ("format", "loss", "batch_size", "sampler", "data", "oops") \
                else raw["fit"] if key in ("scheduler", "optimizer_class", "lr_typo", "epochs") else raw
            target[key] = value
        with pytest.raises(train.RecipeError) as e:
            train.parse_recipe(raw, "r.json")
        return str(e.value)

    assert "r.json: fit: unknown or unimplemented keys ['lr_typo']" in error(lr_typo=1)
    assert "objectives[0]: unknown or unimplemented keys ['oops']" in error(oops=1)
    assert "objectives[0].format: 'pairs' gives 2 texts per example; CosineSimilarityLoss takes 2 texts and a " \
           "score" in error(format="pairs")
    assert "objectives[0].data: nowhere.tsv: no such file" in error(data="nowhere.tsv")
    assert "objectives[0].batch_size=0 must be an integer >= 1" in error(batch_size=0)
    assert "fit.scheduler: 'Linear' is not one of" in error(scheduler="Linear")
    assert "fit.optimizer_class: 'SGD': only AdamW" in error(optimizer_class="SGD")
    assert "objectives[0].sampler: 'random' is not one of" in error(sampler="random")
    assert "recipe: unknown or unimplemented keys ['model']" in error(model="x")


def test_shipped_recipes(tmp_path):
    """Every recipe under recipes/ parses once its data paths exist, and a seed card's recipe has the fit
    block that card prints (the cards are in ../shared/seeds; kure-v1-like.json follows no seed card)."""
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.json"))
    assert len(recipes) == 5
    cards = sorted((REPO.parent / "shared" / "seeds").glob("*.txt"))  # the seed cards, where present
    printed = []
    for card in cards:
        text = card.read_text(encoding="utf-8")
        start = text.index("{", text.index("Parameters of the fit()-Method"))
        printed.append(json.JSONDecoder().raw_decode(text, start)[0])
    for path in recipes:
        raw = json.loads(path.read_text(encoding="utf-8"))
        for i, objective in enumerate(raw["objectives"]):
            fields = 3 if objective["format"] in ("kornli", "triplets", "scored-pairs") else 2
            rows = ["sentence1\tsentence2\tgold_label"] if objective["format"] == "kornli" else []
            objective["data"] = write_tsv(tmp_path / f"{path.stem}{i}.tsv", rows + ["\t".join(["x"] * fields)])
        sts = write_tsv(tmp_path / "sts.tsv", ["score\tsentence1\tsentence2", "1\ta\tb"])
        raw["evaluator"]["data"] = sts
        if raw["objectives"][-1]["format"] == "korsts":
            raw["objectives"][-1]["data"] = sts
        train.parse_recipe(raw, str(path))
        if cards and path.name != "kure-v1-like.json":
            assert raw["fit"] in printed, f"{path.name}: its fit block is on no seed card"


# ---------------------------------------------------------------------------------------------------
# Losses, schedules and parameter groups against sentence-transformers and transformers


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("columns", [2, 3, 4])
def test_mnr_loss_equals_sentence_transformers(similarity, columns):
    """Anchors, positives and 0-2 hard-negative columns: loss and gradients as MultipleNegativesRankingLoss."""
    from sentence_transformers import losses, util

    torch.manual_seed(columns)
    embeddings = [torch.randn(6, 16, dtype=torch.float64, requires_grad=True) for _ in range(columns)]
    scale = 20.0 if similarity == "cos_sim" else 1.0
    ours = multiple_negatives_ranking_loss(embeddings, None, scale=scale, similarity_fct=similarity)
    ours_grads = torch.autograd.grad(ours, embeddings)
    reference = losses.MultipleNegativesRankingLoss(None, scale=scale, similarity_fct=getattr(util, similarity))
    theirs = reference.compute_loss_from_embeddings(embeddings, None)
    assert torch.allclose(ours, theirs, rtol=1e-12), (ours, theirs)
    for a, b in zip(ours_grads, torch.autograd.grad(theirs, embeddings)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_cosine_loss_equals_sentence_transformers():
    from sentence_transformers import losses

    torch.manual_seed(0)
    u, v = (torch.randn(7, 16, requires_grad=True) for _ in range(2))
    labels = torch.rand(7)
    ours = cosine_similarity_loss([u, v], labels)
    theirs = losses.CosineSimilarityLoss(None).compute_loss_from_embeddings([u, v], labels)
    assert ours.item() == theirs.item()  # the same torch calls, bit for bit
    for a, b in zip(torch.autograd.grad(ours, [u, v]), torch.autograd.grad(theirs, [u, v])):
        assert torch.equal(a, b)


def test_loss_names_and_parameters():
    loss, params = get_loss("sentence_transformers.losses.MultipleNegativesRankingLoss.MultipleNegativesRankingLoss",
                            {"scale": 20, "similarity_fct": "util.dot_score"})
    assert loss.fn is multiple_negatives_ranking_loss and params == {"scale": 20.0, "similarity_fct": "dot_score"}
    with pytest.raises(ValueError, match="loss_params: unknown or unimplemented keys .'margin'."):
        get_loss("CosineSimilarityLoss", {"margin": 1})
    with pytest.raises(ValueError, match="not one of"):
        get_loss("TripletLoss", {})
    with pytest.raises(ValueError, match="scale"):
        get_loss("MultipleNegativesRankingLoss", {"scale": 0})


def fit_params(**changes) -> train.FitParams:
    fit = dict(epochs=1, steps_per_epoch=None, scheduler="warmuplinear", warmup_steps=7, optimizer_params={"lr": 1e-3},
               weight_decay=0.01, evaluation_steps=0, max_grad_norm=1, use_amp=False, save_best_model=True)
    return train.FitParams(**{**fit, **changes})


@pytest.mark.parametrize("name", ["ConstantLR", "WarmupConstant", "WarmupLinear", "WarmupCosine",
                                  "WarmupCosineWithHardRestarts"])
def test_schedules_equal_old_fit(name):
    """Every learning rate of 30 steps (warmup 7), against the scheduler old_fit builds."""
    from sentence_transformers import SentenceTransformer

    fit = fit_params(scheduler=name.lower(), warmup_steps=7)
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    st_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ours, theirs = optim.schedule(ours_opt, fit, 30), SentenceTransformer._get_scheduler(st_opt, name, 7, 30)
    for _ in range(34):  # past the end too
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours_opt.step(), st_opt.step(), ours.step(), theirs.step()


def test_weight_decay_groups_equal_old_fit(checkpoints):
    """No weight decay on biases and LayerNorms: the same parameters (by checkpoint key) as old_fit's
    substring rule on sentence-transformers' names, for each architecture."""
    from sentence_transformers import SentenceTransformer

    for arch, path in checkpoints.items():
        ours = SentenceEncoder.from_pretrained(path)
        names = hf_names(path, ours)
        decay, plain = optim.adamw(ours.trainable_modules(), fit_params()).param_groups
        assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
        assert len(decay["params"]) + len(plain["params"]) == len(list(ours.model.parameters()))
        plain = {names[n] for n, p in ours.model.named_parameters() if any(p is q for q in plain["params"])}
        st = SentenceTransformer(str(path), device="cpu")
        no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
        theirs = {n.removeprefix("0.model.") for n, _ in st.named_parameters() if any(nd in n for nd in no_decay)}
        theirs = {n for n in theirs if not n.startswith("pooler.")}  # a pooler ST loads but never uses
        assert plain == theirs, (arch, plain ^ theirs)


# ---------------------------------------------------------------------------------------------------
# Step for step against old_fit


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objectives", [[MNR], [COSINE], [MNR, COSINE]], ids=["mnr", "cosine", "mnr+cosine"])
def test_steps_equal_old_fit(checkpoints, files, arch, objectives):
    """16 steps (2 epochs of 8 batches) at lr 1e-3 through both fits, one objective or two in round robin."""
    r = run_both(checkpoints[arch], files, objectives)
    assert len(r["ours"]) == len(r["st"]) == 16 * len(objectives)
    rel = np.abs(r["ours"] - r["st"]) / np.abs(r["st"])
    print(f"\n{arch} {[o['loss'] for o in objectives]}: loss rel max {rel.max():.2e} (per step {np.round(rel, 7)}), "
          f"update {r['update']:.2e}, embeddings {r['embeddings']:.2e}")
    if rel.max() > 1e-4:
        # Where a pair's cosine nearly meets its label, CosineSimilarityLoss's gradient is cancellation:
        # float32 gets the tiny gradients of the embedding rows only that pair holds a few percent wrong in
        # BOTH fits, AdamW turns them into near full learning-rate steps, and later steps differ by more
        # than 1e-4 (seen on DeBERTa-v2, depending on the texts and the machine). There the reference's own
        # rounding is the bound: old_fit in float64 is the truth, and minisbert's loss must be within twice
        # old_fit's float32 distance from it (docs/training.md).
        with single_thread():
            _, truth = old_fit(checkpoints[arch], r["recipe"], objectives, torch.float64)
        ours_err, st_err = np.abs(r["ours"] - truth) / np.abs(truth), np.abs(r["st"] - truth) / np.abs(truth)
        print(f"float64 old_fit: ours {np.round(ours_err, 7)}, old_fit {np.round(st_err, 7)}")
        missed = (rel > 1e-4) & (ours_err > 2 * np.maximum(st_err, 1e-5))
        assert not missed.any(), f"steps {np.flatnonzero(missed)}: loss {rel.max():.2e} off old_fit, " \
                                 f"{ours_err.max():.2e} off float64 where old_fit is {st_err.max():.2e}"
    assert r["update"] <= 5e-3, f"weights' update differs by {r['update']:.2%} (Frobenius, relative)"
    assert r["embeddings"] <= 5e-3, f"trained embeddings: max abs difference {r['embeddings']:.2e}"


def st_gradients(path: Path, objective: dict, task, batch: list[int], dtype=torch.float32):
    """sentence-transformers' loss class on its own collated batch: (loss, gradients by checkpoint key)."""
    from sentence_transformers import InputExample, SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu").to(dtype).train()
    record: list[float] = []
    scores = task.examples.scores
    features, labels = st.smart_batching_collate(
        [InputExample(texts=list(task.examples.texts[i]), label=scores[i] if scores else 0) for i in batch])
    st_losses(st, [objective], record)[0](features, labels).backward()
    return record[0], {n.removeprefix("0.model."): p.grad for n, p in st.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective", [MNR, COSINE], ids=["mnr", "cosine"])
def test_first_step_loss_and_gradients(checkpoints, files, arch, objective):
    """The first batch's loss and every parameter's gradient against sentence-transformers' loss class on
    its own collated batch: within 1e-5 (relative, per tensor), or within three times old_fit's own
    float32 error where that is larger. Some gradients are sums with heavy cancellation (the biases:
    up to ~2.6e-5 between old_fit in float32 and old_fit in float64), so that bound comes from the
    reference's own rounding, measured against the same loss in float64; minisbert's own distance to
    float64 must also be within twice old_fit's. BERT's key biases have zero gradient in exact arithmetic
    (softmax ignores a constant per query row): both sides hold rounding noise, held to 1e-5 of the
    query bias's gradient (DeBERTa's key bias also reaches p2c, where it counts, and is compared)."""
    path = checkpoints[arch]
    task = loop.build_tasks(recipe(files, [objective]), random.Random(0))[0]
    batch = list(range(8))
    with single_thread():
        ours = SentenceEncoder.from_pretrained(path)
        with ours.mode(train=True):
            loss = loop.batch_loss(ours, task, batch)
            loss.backward()
        st_loss, st_grads = st_gradients(path, objective, task, batch)
        _, truth = st_gradients(path, objective, task, batch, torch.float64)
    assert abs(loss.item() - st_loss) <= 1e-5 * abs(st_loss), f"loss {loss.item()} vs old_fit's {st_loss}"
    names = hf_names(path, ours)
    grads = {n: p.grad for n, p in ours.model.named_parameters()}
    report = {}
    for name, ours_grad in grads.items():
        st_grad, exact = st_grads[names[name]], truth[names[name]]
        if name.endswith("attn.key.bias") and arch != "deberta-v2":
            scale = st_grads[names[name.replace("key", "query")]].norm()
            assert ours_grad.norm() <= 1e-5 * scale and st_grad.norm() <= 1e-5 * scale, name
            continue
        diff, st_error, ours_error = relative(ours_grad, st_grad), relative(st_grad, exact), relative(ours_grad, exact)
        report[name] = f"{diff:.1e} (old_fit vs float64 {st_error:.1e}, minisbert {ours_error:.1e})"
        # Both sides' errors are float32 rounding of the same sums in other orders, so they are alike in
        # size, not equal: over 1,728 tensors (48 batches, both losses, three architectures;
        # scripts/grad_noise.py) minisbert's distance to float64 was at most 1.8x old_fit's and the two
        # sides at most 2.02x old_fit's distance apart. The bounds: 2x and, by the triangle inequality, 3x.
        assert ours_error <= max(1e-5, 2 * st_error), f"{name}: gradient vs float64: {report[name]}"
        assert diff <= max(1e-5, 3 * st_error), f"{name}: gradients differ by {report[name]}"


# ---------------------------------------------------------------------------------------------------
# With dropout on: the same noise, statistically


@pytest.fixture(scope="module")
def noisy_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints with transformers' default dropout (0.1 everywhere) and initializer_range 0.3:
    with BERT's 0.02 the branches' outputs are so small next to the residual stream that the
    embeddings' dropout makes 99% of the noise, and the other sites would go unseen."""
    root = tmp_path_factory.mktemp("noisy")
    return {arch: make_checkpoint(root / arch, arch, config={"initializer_range": 0.3}) for arch in ARCHS}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_noise_equals_transformers(noisy_checkpoints, arch):
    """Each side embeds the same 16 texts 200 times in train mode; the statistic of one forward is the
    mean squared deviation of its embeddings from the eval-mode ones. The two samples' means must agree
    within 4 standard errors (Welch). Measured with 100 forwards: leaving out any one dropout site
    (embeddings, attention probabilities, attention output, FFN output, DeBERTa's relative table) moves
    the mean by 5-27% and z by 4-27; 200 forwards put each at z >= 5.6."""
    z, a, b = dropout_noise(noisy_checkpoints[arch])
    assert abs(z) <= 4, f"dropout noise: minisbert {a:.4e}, transformers {b:.4e} (z = {z:.1f})"


def dropout_noise(path: Path, K: int = 200) -> tuple[float, float, float]:
    """Welch's z of the two sides' train-mode noise (the mean squared deviation of 16 texts' embeddings
    from eval mode, over ``K`` forwards each), and the two mean noises."""
    from sentence_transformers import SentenceTransformer

    texts = corpus(16, seed=5)
    torch.manual_seed(0)
    with single_thread(), torch.no_grad():
        ours = SentenceEncoder.from_pretrained(path)
        clean = ours.embed_for_training(texts)
        with ours.mode(train=True):
            a = np.array([((ours.embed_for_training(texts) - clean) ** 2).mean().item() for _ in range(K)])
        st = SentenceTransformer(str(path), device="cpu").eval()
        features = st.preprocess(texts)
        clean = st(dict(features))["sentence_embedding"]
        st.train()
        b = np.array([((st(dict(features))["sentence_embedding"] - clean) ** 2).mean().item() for _ in range(K)])
    z = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / K + b.var(ddof=1) / K)
    return float(z), float(a.mean()), float(b.mean())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_training_runs_agree(noisy_checkpoints, files, arch):
    """The mnr+cosine run of ``test_steps_equal_old_fit`` with dropout on, 4 seeds on each side. Each run's
    update (trained minus initial weights) is one draw; the two sides' mean updates must differ by no
    more than their seed-to-seed spread allows: ||mean_a - mean_b||^2 / (s_a^2 / n + s_b^2 / n) <= 2,
    s^2 the unbiased total variance of a side's updates. Without a difference in distribution the ratio
    is ~1 (many weakly correlated coordinates average out); measured 0.99-1.02. A coarse check: with the
    attention probabilities' dropout left out on our side it still measured 0.98, because one site
    barely moves the mean update; ``test_dropout_noise_equals_transformers`` is the one that sees it."""
    from sentence_transformers import SentenceTransformer

    path, n = noisy_checkpoints[arch], 4
    rec = recipe(files, [MNR, COSINE])
    examples = [read_examples(list(o.data), o.format, random.Random(0)) for o in rec.objectives]
    ours_updates, st_updates = [], []
    with single_thread():
        for seed in range(n):
            ours = SentenceEncoder.from_pretrained(path)
            names = hf_names(path, ours)
            before = {k: p.detach().clone() for k, p in ours.model.named_parameters()}
            train.fit(ours, rec, None, seed=seed, progress=False)
            after = ours.model.named_parameters()
            ours_updates.append(torch.cat([(p.detach() - before[k]).flatten() for k, p in after]))
            st = SentenceTransformer(str(path), device="cpu")
            torch.manual_seed(100 + seed)
            st.old_fit(list(zip(st_loaders(examples), st_losses(st, [MNR, COSINE], []))), epochs=2,
                       warmup_steps=3, optimizer_params={"lr": 1e-3}, show_progress_bar=False)
            params = dict(st.named_parameters())
            st_updates.append(torch.cat([(params["0.model." + names[k]].detach() - before[k]).flatten()
                                         for k in before]))
    a, b = torch.stack(ours_updates), torch.stack(st_updates)
    spread = lambda u: ((u - u.mean(0)) ** 2).sum() / (len(u) - 1)  # noqa: E731
    ratio = ((a.mean(0) - b.mean(0)) ** 2).sum() / (spread(a) / n + spread(b) / n)
    print(f"\n{arch}: ratio {ratio:.3f}, update norms {a.norm(dim=1).mean():.3f} / {b.norm(dim=1).mean():.3f}")
    assert ratio <= 2, f"mean updates differ by {ratio:.2f} times what the seed-to-seed spread allows"


# ---------------------------------------------------------------------------------------------------
# The command and its output folder


def korsts_file(path: Path, texts: list[str], n: int = 24) -> Path:
    """A KorSTS-format TSV (header, score 0-5) of ``n`` pairs of ``texts``."""
    rows = ["genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2"]
    rows += [f"g\tf\t2012\t{i:04d}\t{(i * 7) % 26 / 5:.3f}\t{texts[2 * i]}\t{texts[2 * i + 1]}" for i in range(n)]
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_command_writes_the_best_model(checkpoints, files, tmp_path, capsys):
    """``minisbert train``: the saved folder is the best evaluation's model, loads in sentence-transformers
    with minisbert's embeddings, and the evaluation CSV and loss log hold every evaluation and step; with
    stderr not a terminal (captured here) it prints a progress line per step of this 8-step run."""
    from sentence_transformers import SentenceTransformer

    from minisbert.cli import main
    from minisbert.sts import evaluate_sts, read_sts

    texts = [t.replace("\t", " ") for t in corpus(60, seed=9)]
    dev = korsts_file(tmp_path / "sts-dev.tsv", texts)
    raw = {"max_seq_length": 64,
           "objectives": [{"data": str(files["scored-pairs"]), "format": "scored-pairs",
                           "loss": "CosineSimilarityLoss", "batch_size": 16, "sampler": "shuffle"}],
           "fit": {"epochs": 2, "evaluation_steps": 2, "warmup_steps": 1, "optimizer_params": {"lr": 1e-3}},
           "evaluator": {"data": str(dev), "format": "korsts"}}
    (tmp_path / "recipe.json").write_text(json.dumps(raw), encoding="utf-8")
    out = tmp_path / "out"
    with single_thread():
        assert main(["train", "--model", str(checkpoints["bert"]), "--recipe", str(tmp_path / "recipe.json"),
                     "--output", str(out), "--seed", "1"]) == 0
    stderr = capsys.readouterr().err
    assert [int(s) for s in re.findall(r"^step (\d+)/8: loss \d+\.\d{4}, lr \S+, \d+ s$", stderr, re.M)] == \
        list(range(1, 9)), stderr
    assert "8 steps in " in stderr and "best score (max Spearman) " in stderr
    rows = (out / "eval" / "similarity_evaluation_sts-dev_results.csv").read_text().splitlines()
    assert rows[0] == "epoch,steps,cosine_pearson,cosine_spearman,euclidean_pearson,euclidean_spearman," \
                      "manhattan_pearson,manhattan_spearman,dot_pearson,dot_spearman"
    steps = [tuple(r.split(",")[:2]) for r in rows[1:]]
    assert steps == [("0", "2"), ("0", "4"), ("0", "-1"), ("1", "2"), ("1", "4"), ("1", "-1")]  # 4 batches an epoch
    losses = (out / "train_loss.csv").read_text().splitlines()
    assert losses[0] == "epoch,step,objective,loss,lr" and len(losses) == 1 + 8
    scores = [max(float(x) for x in r.split(",")[3::2]) for r in rows[1:]]  # the four Spearman columns
    with single_thread():
        saved = SentenceEncoder.from_pretrained(out)
        data = read_sts(dev)
        figures = evaluate_sts(saved, data.sentences1, data.sentences2, data.scores)
        assert max(v for k, v in figures.items() if k.endswith("spearman")) == pytest.approx(max(scores), abs=1e-12)
        assert saved.max_seq_length == 64
        emb = saved.encode(texts[:10])
        reference = SentenceTransformer(str(out), device="cpu").encode(texts[:10])
    assert np.abs(emb - reference).max() <= 1e-5
    # A second run into the same folder is refused before anything loads.
    assert main(["train", "--model", str(checkpoints["bert"]), "--recipe", str(tmp_path / "recipe.json"),
                 "--output", str(out)]) == 2


def test_without_evaluator_the_final_model_is_saved(checkpoints, files, tmp_path):
    rec = recipe(files, [COSINE], epochs=1)
    with single_thread():
        encoder = SentenceEncoder.from_pretrained(checkpoints["roberta"])
        train.fit(encoder, rec, tmp_path / "out", progress=False)
        saved = SentenceEncoder.from_pretrained(tmp_path / "out")
        for (name, a), b in zip(encoder.model.state_dict().items(), saved.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())


def test_progress_lines_where_stderr_is_not_a_terminal(checkpoints, files, capsys):
    """fit's progress where stderr is a file or a pipe (pytest's capture): a line per step of this 8-step
    run, each with both objectives' losses and the learning rate of the loss log; progress=False: none."""
    rec = recipe(files, [MNR, COSINE], epochs=1)
    with single_thread():
        result = train.fit(SentenceEncoder.from_pretrained(checkpoints["bert"]), rec, None)
        lines = capsys.readouterr().err.splitlines()
        train.fit(SentenceEncoder.from_pretrained(checkpoints["bert"]), rec, None, progress=False)
        assert capsys.readouterr().err == ""
    assert len(lines) == 8 and len(result.losses) == 16
    for step, line in enumerate(lines, 1):
        mnr, cosine = result.losses[2 * step - 2], result.losses[2 * step - 1]
        expected = f"step {step}/8: loss {mnr['loss']:.4f}/{cosine['loss']:.4f}, lr {mnr['lr']:.3g}, "
        assert line.startswith(expected) and re.fullmatch(r"\d+ s", line.removeprefix(expected)), (line, expected)


@pytest.mark.parametrize("total, steps", [(250, range(25, 251, 25)), (1000, range(100, 1001, 100)),
                                          (7, range(1, 8)), (35, [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35])])
def test_progress_line_every_tenth_or_100_steps_and_the_last(total, steps, capsys):
    progress = Progress(total)
    for step in range(1, total + 1):
        progress.update(step, [{"loss": 0.5, "lr": 2e-5}])
    printed = [int(line.split()[1].split("/")[0]) for line in capsys.readouterr().err.splitlines()]
    assert printed == list(steps)


def test_scaled_steps_clip_true_gradients_and_a_changed_scale_skips_the_scheduler(checkpoints, files,
                                                                                  monkeypatch):
    """With loss scaling (fp16 on CUDA; here a CPU GradScaler in its place): a scale that never changes gives
    float32's run bit for bit (a power of two scales exactly; clipping sees the unscaled gradients), and a
    step whose scale changed skips its scheduler step, as old_fit's. Growing every second step, the
    schedule advances after steps 1, 3, 5, 7 only."""
    rec = recipe(files, [COSINE], epochs=1)  # 8 steps, WarmupLinear, warmup 3
    scalers = iter([torch.amp.GradScaler("cpu", growth_interval=10**6), torch.amp.GradScaler("cpu", growth_interval=2)])
    with single_thread():
        encoders = [SentenceEncoder.from_pretrained(checkpoints["bert"]) for _ in range(3)]
        fp32 = train.fit(encoders[0], rec, None, progress=False)
        monkeypatch.setattr(loop, "precision", lambda use_amp, device: (None, next(scalers)))
        steady = train.fit(encoders[1], rec, None, progress=False)
        growing = train.fit(encoders[2], rec, None, progress=False)
    assert steady.losses == fp32.losses
    for a, b in zip(encoders[0].model.parameters(), encoders[1].model.parameters()):
        assert torch.equal(a, b)
    expected = [1e-3 * optim.lr_factor("warmuplinear", n, 3, 8) for n in (0, 1, 1, 2, 2, 3, 3, 4)]
    assert [r["lr"] for r in growing.losses] == expected


@pytest.mark.skipif(not cpu_kind().native_bf16, reason="this CPU has no native bf16 (AVX512_BF16 or AMX)")
def test_use_amp_on_cpu_runs_bf16(checkpoints, files):
    """use_amp on a CPU: bf16 autocast; losses close to float32's (bf16 keeps 8 bits of mantissa)."""
    with single_thread():
        fp32 = train.fit(SentenceEncoder.from_pretrained(checkpoints["deberta-v2"]), recipe(files, [MNR], epochs=1),
                         progress=False)
        amp = train.fit(SentenceEncoder.from_pretrained(checkpoints["deberta-v2"]),
                        recipe(files, [MNR], epochs=1, use_amp=True), progress=False)
    a, b = np.array([r["loss"] for r in amp.losses]), np.array([r["loss"] for r in fp32.losses])
    assert np.all(np.isfinite(a)) and not np.array_equal(a, b)
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max(), (a, b)
