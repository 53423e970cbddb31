"""minisbert.sts: the metrics equal scipy and sentence-transformers' EmbeddingSimilarityEvaluator, the readers
keep every row and name the line of a bad one, short names use only the cache when offline, and
``python -m minisbert eval-sts`` reproduces the evaluator on real weights."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import korean_sentences, require_shared_data, shared_data

from minisbert import sts
from minisbert.sts import DataFormatError, DataNotFoundError, evaluate_sts, pearson, rankdata, read_sts, spearman

REPO = Path(__file__).resolve().parents[1]
KORSTS_TEST = "korsts/sts-test.tsv"  # in the shared data
KORSTS_TEST_PAIRS = 1379
KORSTS_HEADER = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
EVALUATOR_KEYS = {f"{fn}_{m}": f"{m}_{fn}" for fn in ("cosine", "euclidean", "manhattan", "dot")
                  for m in ("pearson", "spearman")}  # ours -> sentence-transformers' metric name


def korsts_test() -> Path:
    """The real KorSTS test set, or skip (for figures that only mean something on it)."""
    return require_shared_data(KORSTS_TEST)


def write_generated_sts(path: Path, pairs: int = KORSTS_TEST_PAIRS, identical: int = 10, seed: int = 4) -> Path:
    """A KorSTS-format test set of our own Korean sentences: as many pairs as KorSTS test, ``identical`` of
    them one sentence twice (distance exactly 0, as in KorSTS), some near-copies, gold scores in 0.2 steps
    with ties, and bare '"' in sentences (which csv's default quoting would take for field quotes)."""
    rng = np.random.default_rng(seed)
    sentences = korean_sentences(2 * pairs, seed=seed)
    rows = []
    for i in range(pairs):
        s1, s2 = sentences[2 * i], sentences[2 * i + 1]
        if i % 29 == 5:
            s1 = f'"{s1}" 라고 했다.'
        if i % 31 == 6:
            s2 = s2.replace(" ", ' "', 1)
        score = rng.integers(0, 26) / 5
        if i % (pairs // identical) == 0 and i // (pairs // identical) < identical:
            s2, score = s1, 5.0
        elif i % 7 == 3:  # a near-copy: one word dropped
            words = s1.split()
            s2 = " ".join(words[:-2] + words[-1:]) if len(words) > 2 else s1 + " 정말"
        rows.append(f"main-news\tgenerated\t2024\t{i:04d}\t{score:.1f}\t{s1}\t{s2}\n")
    path.write_text(KORSTS_HEADER + "".join(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sts_test_file(tmp_path_factory) -> Path:
    """The KorSTS test set when the shared data is there, a generated one of the same size otherwise."""
    return shared_data(KORSTS_TEST) or write_generated_sts(tmp_path_factory.mktemp("sts") / "sts-test.tsv")


def random_cases(seed: int = 0):
    """(x, y) pairs: continuous data, and integer data with many ties, like gold scores in 0.2 steps."""
    rng = np.random.default_rng(seed)
    for trial in range(60):
        n = int(rng.integers(3, 400))
        x = rng.normal(size=n) if trial % 2 else rng.integers(0, 1 + trial % 7, n) / 5
        y = rng.integers(0, 26, n) / 25 if trial % 3 else x + rng.normal(size=n)
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            yield x, y


# ---------------------------------------------------------------- metrics

def test_rankdata_averages_ties_like_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    assert rankdata([10, 20, 10, 30, 20, 10]).tolist() == [2, 4.5, 2, 6, 4.5, 2]
    assert rankdata([-0.0, 0.0, 1.0]).tolist() == [1.5, 1.5, 3]  # -0.0 == 0.0: ties, as distances of 0 are
    for x, y in random_cases():
        np.testing.assert_array_equal(rankdata(x), scipy_stats.rankdata(x))
        np.testing.assert_array_equal(rankdata(y), scipy_stats.rankdata(y))


def test_pearson_and_spearman_equal_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for x, y in random_cases(1):
        assert abs(pearson(x, y) - scipy_stats.pearsonr(x, y)[0]) < 1e-12
        assert abs(spearman(x, y) - scipy_stats.spearmanr(x, y)[0]) < 1e-12
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))  # undefined for constant input, as scipy says


class CachedEmbeddings:
    """A stand-in model whose encode returns fixed embeddings by sentence: the evaluator and evaluate_sts
    then see exactly the same vectors, so only their similarity and correlation code is compared."""

    model_card_data = type("NoCard", (), {"set_evaluation_metrics": lambda *args: None})()
    similarity_fn_name = "cosine"

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, sentences, batch_size=32, convert_to_numpy=True, **kwargs):
        return np.stack([self.table[s] for s in sentences])


def test_evaluate_sts_equals_embedding_similarity_evaluator_on_the_same_embeddings():
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    rng = np.random.default_rng(0)
    n, dim = 500, 48
    # 40 sentences appear in both columns: identical embeddings, distance exactly 0, many tied similarities.
    sentences1 = [f"a{i}" for i in range(n)]
    sentences2 = [f"a{i}" if i % 12 == 0 else f"b{i}" for i in range(n)]
    table = {s: rng.normal(size=dim).astype(np.float32) for s in set(sentences1 + sentences2)}
    gold = (rng.integers(0, 26, n) / 25).tolist()
    model = CachedEmbeddings(table)
    evaluator = EmbeddingSimilarityEvaluator(sentences1, sentences2, gold,
                                             similarity_fn_names=["cosine", "euclidean", "manhattan", "dot"])
    expected = evaluator(model)
    ours = evaluate_sts(model, sentences1, sentences2, gold)
    assert ours["pairs"] == n
    import sentence_transformers

    # sentence-transformers < 6 took euclidean distances as sqrt(sum(d ** 2)) (6 and evaluate_sts:
    # vector_norm), which rounds differently in float32: equal there to float32 precision only.
    loose = int(sentence_transformers.__version__.split(".")[0]) < 6
    for key, theirs in EVALUATOR_KEYS.items():
        tol = 1e-7 if loose and key.startswith("euclidean") else 1e-12
        assert abs(ours[key] - expected[theirs]) < tol, (key, ours[key], expected[theirs])


def test_evaluate_sts_checks_its_inputs():
    model = CachedEmbeddings({"a": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="2 first sentences, 1 second"):
        evaluate_sts(model, ["a", "a"], ["a"], [0.5, 0.5])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        evaluate_sts(model, ["a"], ["a"], [0.5])


# ---------------------------------------------------------------- readers

def test_korsts_tsv_keeps_every_row():
    data = read_sts(korsts_test())
    # 1,379 pairs: with csv's default quoting, bare '"' in sentences would merge rows and lose some.
    assert len(data) == len(data.sentences1) == len(data.sentences2) == 1379
    assert data.sentences1[0] == "한 소녀가 머리를 스타일링하고 있다." and data.scores[0] == pytest.approx(2.5 / 5)
    assert min(data.scores) == 0 and max(data.scores) == 1  # gold = score / 5


def test_generic_csv_tsv_jsonl_and_klue_json(tmp_path):
    pairs = [("첫 문장", "둘째 문장", 4.0), ('쉼표, 그리고 "따옴표"', "셋째", 1.5), ("a", "b", 0)]
    (tmp_path / "p.csv").write_text('sentence1,sentence2,score\n첫 문장,둘째 문장,4\n'
                                    '"쉼표, 그리고 ""따옴표""",셋째,1.5\r\n\na,b,0\n', encoding="utf-8-sig")
    (tmp_path / "p.tsv").write_text("score\tsentence2\tsentence1\n" + "".join(
        f"{s}\t{b}\t{a}\n" for a, b, s in pairs), encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s},
                                                         ensure_ascii=False) + "\n\n" for a, b, s in pairs))
    klue = [{"guid": str(i), "sentence1": a, "sentence2": b,
             "labels": {"label": s, "real-label": s + 0.01, "binary-label": int(s >= 3)}}
            for i, (a, b, s) in enumerate(pairs)]
    (tmp_path / "p.json").write_text(json.dumps(klue, ensure_ascii=False, indent=4), encoding="utf-8")
    (tmp_path / "p.txt").write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{s}\n" for a, b, s in pairs), encoding="utf-8")  # unknown extension: tabs in the header
    for name in ("p.csv", "p.tsv", "p.jsonl", "p.json", "p.txt"):
        data = read_sts(tmp_path / name)
        assert list(zip(data.sentences1, data.sentences2)) == [(a, b) for a, b, _ in pairs], name
        assert data.scores == [s / 5 for _, _, s in pairs], name


@pytest.mark.parametrize("name, text, where, message", [
    ("bad.tsv", KORSTS_HEADER + "g\tf\t2012\t1\t2.5\ta\tb\ng\tf\t2012\t2\t2.5\tonly six\n", ":3:", "expected 7 fields"),
    ("bad.tsv", KORSTS_HEADER + "g\tf\t2012\t1\tfive\ta\tb\n", ":2:", "score 'five' is not a finite number"),
    ("bad.tsv", KORSTS_HEADER + "g\tf\t2012\t1\tnan\ta\tb\n", ":2:", "is not a finite number"),
    ("bad.tsv", "genre\tsentence1\tsentence2\nx\ta\tb\n", ":1:", "header lacks score"),
    ("bad.csv", "sentence1,sentence2,score\na,b,1\n\"a,b,1\n", ":3:", "expected 3 fields"),
    ("bad.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"\n', ":2:", "invalid JSON"),
    ("bad.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n\n[1, 2]\n', ":3:", "found list"),
    ("bad.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n', ":1:", "neither 'score' nor 'labels.label'"),
    ("bad.json", '[\n  {"sentence1": "a", "sentence2": "b", "labels": {"label": 1}},\n'
                 '  {"sentence1": "a",\n   "sentence2": 7, "labels": {"label": 1}}\n]', ":3:", "'sentence2'"),
    ("bad.json", '[\n {"sentence1": "a", "sentence2": "b", "score": true}\n]', ":2:", "score True"),
    ("bad.json", '[\n {"sentence1": "a", "sentence2": "b", "score": 1}\n {"x": 1}]', ":3:", "expected ','"),
    ("bad.json", '[{"sentence1": "a", "sentence2": "b", "score": 1},', ":1:", "not closed"),
    ("bad.json", '"just a string"', ":1:", "expected a JSON list"),
    ("bad.json", "[]", ":1:", "no sentence pairs"),
    ("bad.tsv", "", ":1:", "header lacks"),
    ("bad.dat", "sentence1 sentence2 score\na b 1\n", ":1:", "unknown data format"),
])
def test_malformed_files_raise_data_format_error_with_file_and_line(tmp_path, name, text, where, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message) as info:
        read_sts(path)
    assert str(info.value).startswith(f"{path}{where}"), str(info.value)
    assert isinstance(info.value, ValueError)


def test_non_utf8_file_names_its_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes(KORSTS_HEADER.encode() + "g\tf\t2012\t1\t2.5\tcafé\tb\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1.tsv:2: not UTF-8"):
        read_sts(path)


# ---------------------------------------------------------------- short names and the cache

def test_short_name_is_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISBERT_DATA", str(tmp_path))
    monkeypatch.setenv("MINISBERT_OFFLINE", "1")  # a cache hit needs no network
    cached = tmp_path / "korsts" / "sts-dev.tsv"
    cached.parent.mkdir()
    cached.write_text(KORSTS_HEADER + "g\tf\t2012\t1\t2.5\t가\t나\ng\tf\t2012\t2\t5.0\t다\t라\n", encoding="utf-8")
    assert sts.resolve_data("korsts-dev") == cached
    assert read_sts(sts.resolve_data("korsts-dev")).scores == [0.5, 1.0]


@pytest.mark.parametrize("variable", ["MINISBERT_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_short_name_says_what_to_download_and_where(tmp_path, monkeypatch, variable):
    monkeypatch.setenv("MINISBERT_DATA", str(tmp_path))
    monkeypatch.delenv("MINISBERT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setattr(sts.urllib.request, "urlopen", no_network)
    with pytest.raises(DataNotFoundError) as info:
        sts.resolve_data("klue-sts-dev")
    message = str(info.value)
    assert sts.DATASETS["klue-sts-dev"][1] in message
    assert str(tmp_path / "klue-sts" / "klue-sts-v1.1_dev.json") in message and "--data PATH" in message


def test_failed_download_says_what_to_download_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISBERT_DATA", str(tmp_path))
    monkeypatch.delenv("MINISBERT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(url, timeout):
        assert timeout > 0
        raise sts.urllib.error.URLError("no route to host")

    monkeypatch.setattr(sts.urllib.request, "urlopen", unreachable)
    with pytest.raises(DataNotFoundError, match="could not download korsts-test .*no route to host"):
        sts.resolve_data("korsts-test")
    assert list(tmp_path.rglob("*")) == [tmp_path / "korsts"]  # the folder, and no .part file


def test_unknown_name_and_explicit_paths(tmp_path):
    with pytest.raises(DataNotFoundError, match="not one of the data set names korsts-test"):
        sts.resolve_data(str(tmp_path / "missing.tsv"))
    path = tmp_path / "korsts-test"  # an existing file wins over the short name
    path.write_text("x")
    assert sts.resolve_data(str(path)) == path


# ---------------------------------------------------------------- the command on real weights

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minisbert", "eval-sts", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_generated_sts_file_keeps_every_row(tmp_path):
    data = read_sts(write_generated_sts(tmp_path / "sts.tsv"))
    assert len(data) == len(data.sentences1) == len(data.sentences2) == KORSTS_TEST_PAIRS
    assert sum(a == b for a, b in zip(data.sentences1, data.sentences2)) == 10
    assert sum(s.startswith('"') for s in data.sentences1) > 10 and min(data.scores) == 0 and max(data.scores) == 1


def test_cli_errors_are_one_line_on_stderr(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text(KORSTS_HEADER + "g\tf\t2012\t1\t2.5\tonly six\n", encoding="utf-8")
    result = run_cli("--model", str(tmp_path), "--data", str(bad), "--json")
    assert result.returncode != 0 and result.stdout == ""
    assert f"{bad}:2: expected 7 fields" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("--model", str(tmp_path), "--data", str(bad), "--batch-size", "0")
    assert result.returncode == 2 and "must be a positive integer, got '0'" in result.stderr


@pytest.fixture(scope="module")
def minilm_reference(minilm_path, sts_test_file):
    """EmbeddingSimilarityEvaluator on MiniLM and the KorSTS test set (or our generated one), as the cards'
    figures were made."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    data = read_sts(sts_test_file)
    evaluator = EmbeddingSimilarityEvaluator(data.sentences1, data.sentences2, data.scores,
                                             similarity_fn_names=["cosine", "euclidean", "manhattan", "dot"])
    return evaluator(SentenceTransformer(minilm_path, device="cpu"))


@pytest.mark.slow  # ~30 s for the evaluator (fixture) and ~30 s for the command on 2 free cores
def test_cli_json_equals_embedding_similarity_evaluator_on_minilm(minilm_path, minilm_reference, sts_test_file):
    start = time.perf_counter()
    result = run_cli("--model", minilm_path, "--data", str(sts_test_file), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert set(figures) == set(EVALUATOR_KEYS) | {"pairs"} and figures["pairs"] == KORSTS_TEST_PAIRS
    diffs = {key: abs(figures[key] - minilm_reference[theirs]) for key, theirs in EVALUATOR_KEYS.items()}
    report = f"{json.dumps(diffs)} ({time.perf_counter() - start:.0f} s)"
    # Pearson is continuous in the embeddings, which equal sentence-transformers' to ~1e-7.
    assert max(d for k, d in diffs.items() if k.endswith("pearson")) <= 1e-6, report
    # Spearman is not: sentence-transformers' embedding of a sentence moves by ~1e-7 with its batch's padding,
    # so the 10 pairs with identical sentences get distances ~5e-7 there and exactly 0 here, and 1-ulp
    # differences reorder near-ties. Each reordering moves Spearman by <= 6/n^2 (3e-6 for 1,379 pairs);
    # measured 3.4e-6 for euclidean/manhattan, 0 for cosine/dot. The generated set
    # has as many pairs and as many identical ones.
    assert max(d for k, d in diffs.items() if k.endswith("spearman")) <= 1e-5, report


def run_in_process(capsys, *args: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    sts.add_arguments(parser)
    code = sts.run(parser.parse_args(list(args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_has_one_row_per_model_and_the_card_row(minilm_path, sts_test_file, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    card = {key: 50.0 + i for i, key in enumerate(sts.METRICS)}
    (weights / "models.json").write_text(json.dumps({"models": [
        {"name": "all-MiniLM-L6-v2", "hub_id": "sentence-transformers/all-MiniLM-L6-v2", "card_korsts": card}]}))
    monkeypatch.setenv("MINISBERT_WEIGHTS", str(weights))
    model_dir = tmp_path / "all-MiniLM-L6-v2"  # named like the manifest entry, so its card row shows
    model_dir.symlink_to(minilm_path, target_is_directory=True)
    data = tmp_path / "small.tsv"
    data.write_text("".join(sts_test_file.read_text(encoding="utf-8").splitlines(keepends=True)[:41]),
                    encoding="utf-8")
    code, out, err = run_in_process(capsys, "--model", str(model_dir), "--model", minilm_path, "--data", str(data))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("| model") and lines[1].startswith("|---")
    assert lines[2].startswith(f"| {model_dir}") and lines[2].rstrip(" |").endswith("40")
    assert lines[3].startswith("|   card: sentence-transformers/all-MiniLM-L6-v2") and "| 50.00 |" in lines[3]
    assert lines[4].startswith(f"| {minilm_path}")
    assert lines[2].split("|")[2:10] == lines[4].split("|")[2:10]  # same model, same figures
    assert f"{data}: 40 pairs" in err

    code, out, err = run_in_process(capsys, "--model", str(model_dir), "--model", minilm_path, "--data", str(data),
                                    "--json")
    figures = json.loads(out)
    assert code == 0 and set(figures) == {str(model_dir), minilm_path}
    assert figures[minilm_path] == figures[str(model_dir)]
    monkeypatch.setenv("MINISBERT_WEIGHTS", str(tmp_path / "nowhere"))  # no manifest: no card row, no error
    assert sts.card_figures(str(model_dir)) is None
