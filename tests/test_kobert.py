"""KoBERT (first revision of jhgan/ko-sbert-nli): SentencePiece tokenizer and ``0_KoBertTransformer`` layout.

The reference is the ko-sentence-transformers package itself (its ``KoBertTransformer`` module and
``KoBertTokenizer``), run with one shim: since transformers 4.34, ``PreTrainedTokenizer.__init__`` calls
``get_vocab()`` before ``KoBertTokenizer.__init__`` has read ``vocab.txt``, so the shim reads it first;
every method that tokenizes is the package's own.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import OWN_KOREAN, SEED_CONFIGS, corpus, korean_training_text, single_thread

from minisbert import SentenceEncoder
from minisbert.errors import MissingDependencyError, ModelNotFoundError
from minisbert.io.folder import read_tokenizer_files
from minisbert.text.kobert import KoBertTokenizer, preprocess_text, split_digit_comma

spm = pytest.importorskip("sentencepiece")

SPECIALS = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]  # KoBERT's vocab.txt: [PAD]=1
MAX_SEQ_LENGTH = 75  # the KoBERT revision's sentence_bert_config.json

# Texts aimed at each preprocessing rule: accents, digits with commas, `` and '' quotes, whitespace,
# special tokens written in the text, characters the SentencePiece model never saw, Latin case.
EDGE_TEXTS = [
    "가격은 1,250,000원이며 부가세 10,000원 별도.",
    "인구는 9,776,000명, 면적은 605.2㎢이다.",
    "3,000,000,000원을 1,5,7로 나눴다 12,",
    "café naïve Ångström résumé Ölçü",
    "``인용문''이라고 말했다. '작은따옴표'와 \"큰따옴표\"",
    "   앞뒤와   사이에   공백이\t많은\n문장   ",
    "[CLS] 특수 토큰이 [SEP]본문에[MASK] 있다 [PAD][UNK]",
    "눈사람 ☃ 과 용 龍 그리고 😀 이모지",
    "Seoul IS The CAPITAL of Korea, ＡＢＣ ｆｕｌｌｗｉｄｔｈ ①②",
    "",
    " ",
]


def kobert_tokenizer(folder):
    """Our KoBERT tokenizer for a folder's files, truncating as the encoder would set it."""
    tok = KoBertTokenizer.from_files(read_tokenizer_files(folder, kobert=True), do_lower_case=False)
    tok.max_seq_length = MAX_SEQ_LENGTH
    return tok


def korean_lines() -> list[str]:
    """SentencePiece training text: 5,000 KorSTS train sentences (or as many generated ones), plus prices
    written with commas."""
    rng = random.Random(0)
    prices = [f"가격은 {rng.randrange(1000, 10**8):,}원, 할인가는 {rng.randrange(1000, 10**6):,}원이다."
              for _ in range(400)]
    return korean_training_text(limit=5000) + OWN_KOREAN + prices


def write_kobert_checkpoint(root: Path, vocab_size: int = 2000, seed: int = 0) -> Path:
    """A tiny random KoBERT-layout sentence-transformers folder (modules.json -> 0_KoBertTransformer,
    1_Pooling), its SentencePiece model trained on Korean text."""
    import transformers

    model_dir = root / "0_KoBertTransformer"
    model_dir.mkdir(parents=True)
    buf = io.BytesIO()
    # Pieces ending in digit + comma are what the digit+comma rule re-splits; the trainer rarely learns
    # them on its own, so two are forced in as user-defined symbols.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(korean_lines()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=0.9995, split_by_number=False,
                                   user_defined_symbols=["000,", "5,"], num_threads=2, minloglevel=2)
    (model_dir / "tokenizer_78b3253a26.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]
    # vocab.txt decides the ids, not the .model: shuffle the pieces so the two orders disagree, and leave
    # every 25th piece out so that known-to-SentencePiece but not-in-vocab pieces must become [UNK].
    random.Random(seed).shuffle(pieces)
    vocab = SPECIALS + [p for i, p in enumerate(pieces) if i % 25 != 7]
    (model_dir / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    (model_dir / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}), encoding="utf-8")
    (model_dir / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False}), encoding="utf-8")

    torch.manual_seed(seed)
    config = transformers.BertConfig(**dict(SEED_CONFIGS["bert"], vocab_size=len(vocab), pad_token_id=1))
    model = transformers.BertModel(config)  # with the pooler, as KoBERT has it: the loader must ignore it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval().save_pretrained(model_dir)

    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": config.hidden_size, "pooling_mode_mean_tokens": True}), encoding="utf-8")
    modules = [{"idx": 0, "name": "0", "path": "0_KoBertTransformer",
                "type": "ko_sentence_transformers.models.KoBertTransformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (root / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    return root


def reference_tokenizer_class():
    """ko_sentence_transformers' KoBertTokenizer, made constructible under transformers >= 4.34."""
    pytest.importorskip("ko_sentence_transformers")
    from ko_sentence_transformers.models.tokenizer import KoBertTokenizer as Upstream

    class Reference(Upstream):
        def __init__(self, vocab_file, vocab_txt, *args, **kwargs):
            # PreTrainedTokenizer.__init__ calls get_vocab(); Upstream.__init__ re-reads vocab.txt after it.
            self.token2idx, self.idx2token = {}, []
            with open(vocab_txt, encoding="utf-8") as f:
                for idx, token in enumerate(f):
                    self.token2idx[token.strip()] = idx
                    self.idx2token.append(token.strip())
            super().__init__(vocab_file, vocab_txt, *args, **kwargs)

    return Reference


def reference_module(folder: Path):
    """The package's KoBertTransformer.load(0_KoBertTransformer), its tokenizer replaced by the shim."""
    reference = reference_tokenizer_class()
    module_file = sys.modules["ko_sentence_transformers.models.KoBertTransformer"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module_file, "KoBertTokenizer", reference)
        return module_file.KoBertTransformer.load(str(folder / "0_KoBertTransformer"))


@pytest.fixture(scope="module")
def kobert(tmp_path_factory) -> Path:
    return write_kobert_checkpoint(tmp_path_factory.mktemp("kobert"))


@pytest.fixture
def one_thread():
    """A 64-wide model gains nothing from threads, and on a shared 2-core machine two spinning
    intra-op threads made encoding ~15x slower; restored afterwards."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def texts() -> list[str]:
    base = corpus(300, seed=3)
    passages = [" ".join(base[i: i + k]) for i, k in ((0, 6), (50, 15), (100, 40))]  # past max_seq_length
    return EDGE_TEXTS + passages + base


# -- pure helpers, by hand -------------------------------------------------------------------------

def test_preprocess_text_rules():
    assert preprocess_text("  a \t b\n\nc  ") == "a b c"
    assert preprocess_text("``quoted''") == '"quoted"'
    assert preprocess_text("café Ångström") == "cafe Angstrom"
    assert preprocess_text("café", keep_accents=True) == "café"
    assert preprocess_text("ＡＢ Cd", lowercase=True) == "ab cd"  # NFKD folds full-width letters too
    assert preprocess_text(" a  b ", remove_space=False) == " a  b "
    # Hangul decomposes into conjoining jamo (not combining marks): kept, as KoBertTokenizer keeps them.
    assert preprocess_text("한") == "\u1112\u1161\u11ab"


def test_split_digit_comma_by_hand():
    fake = {"1": ["▁1"], "000": ["▁", "000"], "12": ["▁12"]}.__getitem__
    assert split_digit_comma(["▁1,", "000,", "원"], fake) == ["▁1", ",", "000", ",", "원"]
    assert split_digit_comma(["▁a,", "12,"], fake) == ["▁a,", "12", ","]  # a letter before the comma: kept
    assert split_digit_comma([","], fake) == [","]


# -- parity with ko-sentence-transformers ----------------------------------------------------------

def test_token_ids_match_reference(kobert, texts):
    module = reference_module(kobert)
    ours = SentenceEncoder.from_pretrained(kobert)
    assert ours.max_seq_length == MAX_SEQ_LENGTH and ours.tokenizer.pad_id == 1
    ids, mask = ours.tokenizer(texts)
    ref = module.tokenize(texts)
    ref_rows = [row[: int(m.sum())] for row, m in zip(ref["input_ids"].tolist(), ref["attention_mask"])]
    bad = [t for t, a, b in zip(texts, ours.tokenizer.encode_ids(texts), ref_rows) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts tokenize differently; first: {bad[:3]!r}"
    diff = (ids - ref["input_ids"]).abs().max().item()
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"]), \
        f"padded batch differs: max abs id diff {diff}"
    # The rules under test did fire: truncation, [UNK], literal specials, and the digit+comma split.
    assert (mask.sum(1) == MAX_SEQ_LENGTH).any() and (ids == 0).any()
    raw = [p for t in texts for p in ours.tokenizer.sp.encode(preprocess_text(t), out_type=str)]
    assert any(re.search(r"\d,$", p) for p in raw), "no piece ends in digit+comma: the split rule went untested"


@pytest.mark.parametrize("options", [{"do_lower_case": True}, {"keep_accents": True},
                                     {"remove_space": False, "keep_accents": True}])
def test_tokenizer_options_match_reference(kobert, texts, tmp_path, options):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer_78b3253a26.model", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((kobert / "0_KoBertTransformer" / name).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(options), encoding="utf-8")
    reference = reference_tokenizer_class().from_pretrained(str(folder))
    ours = kobert_tokenizer(folder)
    for text in texts[:120]:
        assert ours.tokenize(text) == reference.tokenize(text), repr(text)
        want = reference(text, truncation="longest_first", max_length=MAX_SEQ_LENGTH)["input_ids"]
        assert ours.encode_ids([text])[0] == want, repr(text)


def test_embeddings_match_reference(kobert, texts, one_thread):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    module = reference_module(kobert)
    st = SentenceTransformer(modules=[module, Pooling(module.get_word_embedding_dimension(), pooling_mode="mean")],
                             device="cpu")
    want = st.encode(texts, batch_size=16, convert_to_numpy=True)
    got = SentenceEncoder.from_pretrained(kobert).encode(texts, batch_size=16)
    diff = abs(got - want)
    assert got.shape == want.shape and diff.max() <= 1e-5, \
        f"embeddings differ: max abs {diff.max():.3g}, mean abs {diff.mean():.3g}"


def test_sentence_transformers_lowercasing_matches_reference(kobert, texts):
    module = reference_module(kobert)
    module.do_lower_case = True  # sentence_bert_config.json's flag: str.lower() before the tokenizer
    ours = SentenceEncoder.from_pretrained(kobert).tokenizer
    ours.do_lower_case = True
    ids = module.tokenize(texts[:120])["input_ids"]
    assert torch.equal(ours(texts[:120])[0], ids)


def test_config_without_model_type_is_bert(kobert, tmp_path):
    # KoBertTransformer builds a BertModel whatever config.json says; old KoBERT configs lack model_type.
    import shutil

    folder = shutil.copytree(kobert, tmp_path / "kobert")
    config_file = folder / "0_KoBertTransformer" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    del config["model_type"]
    config_file.write_text(json.dumps(config), encoding="utf-8")
    texts = EDGE_TEXTS[:4]
    got = SentenceEncoder.from_pretrained(folder).encode(texts)
    want = SentenceEncoder.from_pretrained(kobert).encode(texts)
    assert abs(got - want).max() == 0


# -- errors ----------------------------------------------------------------------------------------

def test_missing_sentencepiece_names_the_extra(kobert, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"minisbert\[kobert\]"):
        SentenceEncoder.from_pretrained(kobert)


def test_missing_sentencepiece_model_is_named(kobert, tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes((kobert / "0_KoBertTransformer" / "vocab.txt").read_bytes())
    with pytest.raises(ModelNotFoundError, match="tokenizer_78b3253a26.model"):
        kobert_tokenizer(folder)
