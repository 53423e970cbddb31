"""Text -> padded id tensors with the ``tokenizers`` library, as sentence-transformers tokenizes.

``tokenizer.json`` is used when present; otherwise XLM-R's Unigram is rebuilt from
``sentencepiece.bpe.model`` (``text/sentencepiece.py``), or a WordPiece tokenizer from ``vocab.txt`` +
``tokenizer_config.json``, exactly as transformers' converters build them. Truncation is
``longest_first`` to ``max_seq_length`` counting ``[CLS]``/``[SEP]``; a batch is padded to its longest
row; token type ids are not produced (every model here uses type 0).

Two things happen before the ``tokenizers`` library sees a text (see ``TextTokenizer.encode_ids``):
surrogate code points (``"\\ud800"``, which no UTF-8 string can hold and the library refuses, failing
the whole batch) become U+FFFD, and a very long text is shortened (``long_texts.LongTexts``) whenever
that provably keeps the tokens truncation keeps, so a 5 MB text of any shape costs what a few
thousand characters do.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram, WordPiece

from minisbert.errors import ConfigError
from minisbert.io.files import TOKENIZER_LIMIT, read_text
from minisbert.io.folder import TokenizerFiles
from minisbert.text.long_texts import LongTexts, _has_lowercase, words_tokenized_alone
from minisbert.text.sentencepiece import SPECIAL_DEFAULTS as SPM_SPECIALS
from minisbert.text.sentencepiece import xlmr_from_spm

# Surrogates are code points but not Unicode scalar values: Python strings can hold them (from
# "\\ud800" escapes, or bytes decoded with errors="surrogateescape"), UTF-8 and the Rust tokenizer cannot.
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with each surrogate code point replaced by U+FFFD (the same object when it has none).

    BERT's normaliser then drops U+FFFD like a control character; other tokenizers map it to their
    unknown token. sentence-transformers raises ``TypeError`` on such a text instead."""
    return _SURROGATES.sub("\ufffd", text)


# sentence-transformers (6.x) reads a dict as one multimodal input: {"text": ...} is that text.
MODALITIES = ("audio", "image", "text", "video")


def check_texts(sentences) -> list[str]:
    """A list of ``str`` (any sequence or iterable of them, or of ``{"text": str}`` dicts, which
    sentence-transformers reads as that text); anything else raises TypeError or ValueError naming the
    item."""
    if isinstance(sentences, (bytes, bytearray)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, text in enumerate(texts):
        if isinstance(text, dict):
            texts[i] = text = dict_text(text, f"sentences[{i}]")
        if not isinstance(text, str):
            pair = " (sentence pairs are not supported)" if isinstance(text, tuple) else ""
            raise TypeError(f"sentences[{i}] is {type(text).__name__}, expected str{pair}")
    return texts


def dict_text(item: dict, where: str) -> str:
    """The text of a multimodal input, as sentence-transformers reads it: {"text": str} is that text; other
    or unknown keys, an empty dict, or a pair of texts under "text" are errors naming ``where``."""
    unknown = [k for k in item if k not in MODALITIES]
    if unknown:
        raise ValueError(f"{where} has keys {unknown}, not modalities (expected keys from {list(MODALITIES)})")
    if list(item) != ["text"]:
        other = [k for k in item if k != "text"]
        raise ValueError(f"{where} is {'an empty dict' if not item else f'a {other[0]} input'}; minisbert "
                         f"embeds text only ({{'text': str}})")
    text = item["text"]
    if not isinstance(text, str):
        pair = " (a sentence pair, which minisbert does not support)" if isinstance(text, (list, tuple)) else ""
        raise TypeError(f"{where}['text'] is {type(text).__name__}, expected str{pair}")
    return text


def token_str(value, default: str) -> str:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content", default)
    return value if isinstance(value, str) else default


def wordpiece_from_vocab(vocab_path: Path, tok_config: dict) -> Tokenizer:
    """BERT WordPiece from ``vocab.txt``, configured like transformers' BertTokenizerFast."""
    vocab: dict[str, int] = {}
    # Lines as a text-mode file gives them (universal newlines), read within the tokenizer-file limit.
    lines = io.StringIO(read_text(vocab_path, "vocabulary", TOKENIZER_LIMIT), newline=None)
    for index, line in enumerate(lines):
        vocab[line.rstrip("\n")] = index  # a repeated token keeps its last line, as transformers' load_vocab
    unk = token_str(tok_config.get("unk_token"), "[UNK]")
    cls = token_str(tok_config.get("cls_token"), "[CLS]")
    sep = token_str(tok_config.get("sep_token"), "[SEP]")
    for token in (unk, cls, sep):
        if token not in vocab:
            raise ConfigError(f"{vocab_path}: special token {token!r} is not in the vocabulary")
    tok = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=tok_config.get("tokenize_chinese_chars", True),
        strip_accents=tok_config.get("strip_accents"),  # None: follow lowercase, as BERT does
        lowercase=tok_config.get("do_lower_case", True),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # Special tokens written in the text stay whole, as transformers registers them.
    specials = [token_str(tok_config.get(k), d) for k, d in
                (("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                 ("sep_token", "[SEP]"), ("mask_token", "[MASK]"))]
    tok.add_special_tokens([s for s in specials if s in vocab])
    return tok


class TextTokenizer:
    """Tokenizes batches of text into (input_ids, attention_mask) tensors of shape (B, T)."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int, do_lower_case: bool = False, unk_token: str | None = None):
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self._unk_token = unk_token  # the config's, for models that do not name theirs (Unigram)
        self.do_lower_case = do_lower_case
        if do_lower_case and not _has_lowercase(tokenizer.normalizer):
            # sentence-transformers (6.x) lowercases with a Lowercase step in front of the normaliser, not
            # with str.lower(): special tokens written in the text ("[MASK]") stay special, a final Σ
            # becomes σ (not ς), and the text is not stripped.
            norm = tokenizer.normalizer
            rest = list(norm) if isinstance(norm, normalizers.Sequence) else [] if norm is None else [norm]
            tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
        tokenizer.no_padding()
        self._max_seq_length = None  # no truncation until the encoder sets it
        self.cut_is_safe = words_tokenized_alone(tokenizer)
        self.long_texts = LongTexts(tokenizer) if self.cut_is_safe else None

    @classmethod
    def from_files(cls, files: TokenizerFiles, do_lower_case: bool, fallback_pad_id: int) -> "TextTokenizer":
        """The tokenizer of a transformer folder (``folder.read_tokenizer_files``): ``tokenizer.json`` when
        present, else XLM-R's Unigram from ``sentencepiece.bpe.model``, else WordPiece from ``vocab.txt``."""
        tok_config = files.config
        if files.tokenizer_json is not None:
            text = read_text(files.tokenizer_json, "tokenizer", TOKENIZER_LIMIT)
            try:
                tok = Tokenizer.from_str(text)
            except Exception as e:  # the Rust side raises plain Exception
                raise ConfigError(f"{files.tokenizer_json}: unreadable tokenizer ({e})") from None
        elif files.sentencepiece is not None:
            # transformers reads tokenizer_config.json, then lets special_tokens_map.json override it.
            names = {**tok_config, **files.special_tokens_map}
            specials = {k: names.get(k) for k in SPM_SPECIALS}  # strings or AddedToken dicts
            prefix = tok_config.get("add_prefix_space", True)
            if not isinstance(prefix, bool):
                raise ConfigError(f"{files.folder / 'tokenizer_config.json'}: add_prefix_space={prefix!r} must be "
                                  f"true or false")
            tok = xlmr_from_spm(files.sentencepiece, specials, prefix)
        else:
            tok = wordpiece_from_vocab(files.vocab_txt, tok_config)
        pad_token = token_str(tok_config.get("pad_token"), "")
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        if pad_id is None and tok.padding is not None:
            pad_id = tok.padding.get("pad_id")
        if pad_id is None:
            pad_id = fallback_pad_id
        return cls(tok, pad_id, do_lower_case, token_str(tok_config.get("unk_token"), "") or None)

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids of the special tokens ([CLS], [SEP], [PAD], ...): transformers' ``all_special_ids``."""
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

    @property
    def unk_id(self) -> int | None:
        """The unknown token's id, where the tokenizer's model has one (WordPiece, BPE; a Unigram's is the
        config's ``unk_token``)."""
        name = getattr(self.tokenizer.model, "unk_token", None)
        if name is None and isinstance(self.tokenizer.model, Unigram):
            name = self._unk_token
        return self.tokenizer.token_to_id(name) if isinstance(name, str) else None

    @property
    def max_seq_length(self) -> int | None:
        """Where texts are cut; set (and checked) by the encoder, which owns the value."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self._max_seq_length = value
        self.tokenizer.enable_truncation(max_length=value, strategy="longest_first")

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated, with [CLS]/[SEP]; no padding."""
        texts = [clean_text(t) for t in texts]
        # The library tokenizes a whole text before truncating it (3-13 us per character). A text longer than
        # max_seq_length * cut_chars_per_token characters is cut there (at the next cut point) and squeezed
        # (``LongTexts``); where that keeps too few tokens, the whole text is squeezed and cut four times
        # further on, again, until its tokens fill max_seq_length or nothing is left to cut.
        chars = self.max_seq_length * self.cut_chars_per_token if self.max_seq_length and self.cut_is_safe else 0
        long = [b for b, t in enumerate(texts) if chars and len(t) > chars]
        short, cut = list(texts), {}
        for b in long:
            cut[b] = self.long_texts.prefix(texts[b], chars)
            short[b] = self.long_texts.squeeze(cut[b])
        # An Encoding holds tokens, offsets and masks besides the ids (~10 KB for a 50-token text), so
        # keep only the ids of each slice: 100k texts at once peaked ~1 GB above their ids.
        ids = [e.ids for start in range(0, len(short), 1024)
               for e in self.tokenizer.encode_batch(short[start: start + 1024], add_special_tokens=True)]
        for b in long:
            if len(ids[b]) == self.max_seq_length or len(cut[b]) == len(texts[b]):
                continue
            whole, until = self.long_texts.squeeze(texts[b]), chars
            while True:
                piece = self.long_texts.prefix(whole, until)
                ids[b] = self.tokenizer.encode(piece, add_special_tokens=True).ids
                if len(ids[b]) == self.max_seq_length or len(piece) == len(whole):
                    break
                until *= 4
        return ids

    # A cut text keeps max_seq_length * this many characters (and up to the next cut point); 16 is ~3x the
    # characters per WordPiece token of Korean or English prose, so cutting again is rare.
    cut_chars_per_token = LongTexts.chars_per_token

    def pad(self, ids: list[list[int]], device: str | torch.device = "cpu",
            length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to ``length`` tokens (default: the longest row): (B, T) input_ids and (B, T)
        attention_mask (int64)."""
        input_ids, attention_mask = pad_ids(ids, self.pad_id, length)
        return input_ids.to(device), attention_mask.to(device)

    def __call__(self, texts: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.encode_ids(texts), device)


def pad_ids(ids: list[list[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids to ``length`` (default: the longest row): (B, T) input_ids and (B, T)
    attention_mask, int64, on the host."""
    T = max(len(row) for row in ids) if length is None else length
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
    for b, row in enumerate(ids):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, : len(row)] = 1
    return input_ids, attention_mask
