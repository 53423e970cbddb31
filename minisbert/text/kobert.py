"""SKT KoBERT's SentencePiece tokenizer, as ``ko_sentence_transformers`` runs it.

The first revision of ``jhgan/ko-sbert-nli`` was built on KoBERT and stores its encoder as a
``ko_sentence_transformers.models.KoBertTransformer`` module (``0_KoBertTransformer/``): a plain BERT
(vocab 8002, ``[PAD]=1``) read by ``models/bert.py``, and this tokenizer. What differs from WordPiece:

- Pieces come from a SentencePiece model (``tokenizer_78b3253a26.model``) but their ids come from
  ``vocab.txt`` (``[UNK]=0 [PAD]=1 [CLS]=2 [SEP]=3 [MASK]=4``, then pieces); a piece missing from
  ``vocab.txt`` becomes ``[UNK]``.
- Text is preprocessed first: whitespace runs collapsed, ````` and ``''`` turned into ``"``, NFKD with
  combining marks dropped (unless ``keep_accents``), lowercased if the tokenizer config says so.
- A piece ending in digit + comma (``"000,"``) is re-encoded without the comma, as XLNet/ALBERT do.
- Special tokens written in the text (``"[SEP]"``) stay whole: transformers' slow tokenizer splits the
  text on them before calling ``_tokenize`` on each chunk.

Reference: ``KoBertTokenizer`` in ko-sentence-transformers 0.3 (PyPI), ``models/tokenizer/KoBertTokenizer.py``,
and ``KoBertTransformer.tokenize`` (strip, optional ``str.lower()``, truncation ``longest_first``).
``sentencepiece`` is an optional dependency: ``pip install "minisbert[kobert]"``.
"""

from __future__ import annotations

import io
import re
import unicodedata
from pathlib import Path

import torch

from minisbert.errors import ConfigError, MissingDependencyError
from minisbert.io.files import TOKENIZER_LIMIT, read_bytes, read_text
from minisbert.io.folder import TokenizerFiles
from minisbert.text.tokenizer import TextTokenizer, token_str

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-start marker
SPECIAL_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "mask_token": "[MASK]"}


def _sentencepiece(model_file: Path):
    # Imported here so that minisbert itself never needs sentencepiece.
    try:
        import sentencepiece as spm
    except ImportError:
        raise MissingDependencyError(
            f"{model_file}: KoBERT checkpoints need the sentencepiece package; install it with "
            f"`pip install \"minisbert[kobert]\"` (or `pip install sentencepiece`)") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(read_bytes(model_file, "SentencePiece model", TOKENIZER_LIMIT))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{model_file}: unreadable SentencePiece model ({e})") from None
    return sp


def read_vocab(path: Path) -> dict[str, int]:
    """``vocab.txt`` as KoBertTokenizer reads it: lines stripped, a repeated token keeps its last id."""
    vocab: dict[str, int] = {}
    for index, line in enumerate(io.StringIO(read_text(path, "vocabulary", TOKENIZER_LIMIT), newline=None)):
        vocab[line.strip()] = index
    return vocab


def preprocess_text(text: str, remove_space: bool = True, keep_accents: bool = False,
                    lowercase: bool = False) -> str:
    """KoBertTokenizer.preprocess_text: collapse whitespace, normalise quotes, drop accents, lowercase."""
    if remove_space:
        text = " ".join(text.strip().split())
    text = text.replace("``", '"').replace("''", '"')
    if not keep_accents:
        # NFKD splits 'é' into 'e' + U+0301; dropping the combining mark leaves 'e'. Hangul syllables
        # decompose into conjoining jamo, which are not combining marks, so they survive (as jamo).
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
    if lowercase:
        text = text.lower()
    return text


def split_digit_comma(pieces: list[str], encode) -> list[str]:
    """Re-encode pieces like ``'▁1,'`` / ``'000,'`` without their trailing comma, comma as its own
    piece (XLNet/ALBERT's rule, kept by KoBertTokenizer). ``encode``: str -> list of pieces."""
    out: list[str] = []
    for piece in pieces:
        if len(piece) > 1 and piece[-1] == "," and piece[-2].isdigit():
            sub = encode(piece[:-1].replace(SPIECE_UNDERLINE, ""))
            # Re-encoding adds a word-start marker; drop it when the original piece continued a word.
            if piece[0] != SPIECE_UNDERLINE and sub[0][0] == SPIECE_UNDERLINE:
                sub = sub[1:] if len(sub[0]) == 1 else [sub[0][1:]] + sub[1:]
            out += sub + [piece[-1]]
        else:
            out.append(piece)
    return out


class KoBertTokenizer:
    """Tokenizes batches of text into (input_ids, attention_mask) tensors of shape (B, T), like
    ``TextTokenizer`` but with KoBERT's SentencePiece model and ``vocab.txt``."""

    def __init__(self, sp, vocab: dict[str, int], do_lower_case: bool = False, *,
                 specials: dict[str, str] | None = None, remove_space: bool = True, keep_accents: bool = False,
                 lowercase: bool = False):
        self.sp = sp
        self.vocab = vocab
        self.do_lower_case = do_lower_case  # sentence-transformers' flag: str.lower() before tokenizing
        self.remove_space, self.keep_accents, self.lowercase = remove_space, keep_accents, lowercase
        specials = dict(SPECIAL_DEFAULTS, **(specials or {}))
        for key, token in specials.items():
            if token not in vocab:
                raise ConfigError(f"vocab.txt: special token {key}={token!r} is not in the vocabulary")
        self.unk_id, self.cls_id, self.sep_id = (vocab[specials[k]] for k in ("unk_token", "cls_token", "sep_token"))
        self.pad_id = vocab[specials["pad_token"]]
        # Longest first so that one special token never hides a longer one starting at the same place.
        names = sorted(set(specials.values()), key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")
        self._specials = set(names)
        self.special_ids = frozenset(vocab[t] for t in names)  # transformers' all_special_ids
        self.max_seq_length: int | None = None  # no truncation until the encoder sets it

    @classmethod
    def from_files(cls, files: TokenizerFiles, do_lower_case: bool) -> "KoBertTokenizer":
        """From a KoBertTransformer folder's files (``folder.read_tokenizer_files(..., kobert=True)``):
        the SentencePiece model, ``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
        config = files.config
        if files.added_tokens:
            raise ConfigError(f"{files.folder / 'added_tokens.json'}: added tokens are not supported for KoBERT")
        # transformers reads the config first, then lets special_tokens_map.json override it.
        specials = {k: token_str(config.get(k), d) for k, d in SPECIAL_DEFAULTS.items()}
        specials.update({k: token_str(v, specials[k]) for k, v in files.special_tokens_map.items()
                         if k in SPECIAL_DEFAULTS})
        return cls(_sentencepiece(files.sentencepiece), read_vocab(files.vocab_txt), do_lower_case,
                   specials=specials, remove_space=bool(config.get("remove_space", True)),
                   keep_accents=bool(config.get("keep_accents", False)),
                   lowercase=bool(config.get("do_lower_case", False)))

    def _pieces(self, chunk: str) -> list[str]:
        text = preprocess_text(chunk, self.remove_space, self.keep_accents, self.lowercase)
        return split_digit_comma(self.sp.encode(text, out_type=str), lambda s: self.sp.encode(s, out_type=str))

    def tokenize(self, text: str) -> list[str]:
        """Pieces of one text, special tokens written in it kept whole; no [CLS]/[SEP]."""
        pieces: list[str] = []
        for chunk in self._special_split.split(text):
            if chunk in self._specials:
                pieces.append(chunk)
            elif chunk:
                pieces += self._pieces(chunk)
        return pieces

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_seq_length``, with [CLS]/[SEP]; no padding."""
        texts = [t.strip() for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        keep = self.max_seq_length - 2 if self.max_seq_length else None  # room for [CLS] and [SEP]
        return [[self.cls_id] + [self.vocab.get(p, self.unk_id) for p in self.tokenize(t)][:keep] + [self.sep_id]
                for t in texts]

    # Right-padding with pad_id is the same as for WordPiece.
    pad = TextTokenizer.pad

    def __call__(self, texts: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.encode_ids(texts), device)

