"""Text -> padded id tensors with the ``tokenizers`` library, as sentence-transformers tokenizes.

``tokenizer.json`` is used when present; otherwise a WordPiece tokenizer is rebuilt from
``vocab.txt`` + ``tokenizer_config.json`` exactly as transformers' ``BertTokenizerFast`` converter
builds it. Truncation is ``longest_first`` to ``max_seq_length`` counting ``[CLS]``/``[SEP]``; a batch
is padded to its longest row; token type ids are not produced (every model here uses type 0).

Two things happen before the ``tokenizers`` library sees a text (see ``TextTokenizer.encode_ids``):
surrogate code points (``"\\ud800"``, which no UTF-8 string can hold and the library refuses, failing
the whole batch) become U+FFFD, and a very long text is shortened (``LongTexts``: runs of whitespace
squeezed, words too long for WordPiece cut to a length that is still too long, the text cut at a word
boundary) whenever that provably keeps the tokens truncation keeps, so a 5 MB text of any shape costs
what a few thousand characters do.
"""

from __future__ import annotations

import io
import re
import string
import unicodedata
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from minisbert.errors import ConfigError
from minisbert.files import TOKENIZER_LIMIT, read_text
from minisbert.folder import TokenizerFiles

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


def words_tokenized_alone(tok: Tokenizer) -> bool:
    """Whether ``tok`` tokenizes each space-separated word on its own (BERT normaliser, whitespace or
    BERT pre-tokenizer, WordPiece, no added token with a space in it), so that cutting a text at a
    space cannot change the tokens before the cut."""
    # Each of these normalisers maps characters one by one (BERT's NFD for strip_accents cannot move a
    # mark across a space), so text before a space normalises the same whatever follows it.
    per_char = (normalizers.BertNormalizer, normalizers.Lowercase)
    norm = tok.normalizer
    steps = (isinstance(tok.model, WordPiece)
             and (norm is None or isinstance(norm, per_char)
                  or isinstance(norm, normalizers.Sequence) and all(isinstance(n, per_char) for n in norm))
             and isinstance(tok.pre_tokenizer, (pre_tokenizers.BertPreTokenizer, pre_tokenizers.Whitespace,
                                                pre_tokenizers.WhitespaceSplit)))
    return steps and not any(any(c.isspace() for c in t.content) for t in tok.get_added_tokens_decoder().values())


def _has_lowercase(norm) -> bool:
    """sentence-transformers' test for an existing Lowercase step (a lowercasing BertNormalizer does
    not count, so it adds one in front of it too)."""
    if isinstance(norm, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in norm)
    return isinstance(norm, normalizers.Lowercase)


# -- long texts ------------------------------------------------------------------------------------
# The tokenizers library normalises, splits and tokenizes a whole text before truncating it, keeping
# offsets for every byte: 5 MB of Korean without spaces took 65 s and +1.7 GB, to produce [CLS] [UNK]
# [SEP]. ``LongTexts`` gives the library a short text with the same first max_seq_length tokens
# instead. Every step rests on the tokenizer being WordPiece behind per-character normalisers and a
# whitespace or BERT pre-tokenizer (``words_tokenized_alone``): no token of a word depends on another
# word, and (BERT's pre-tokenizer) a word ends only at whitespace, punctuation or a CJK ideograph.

# Whitespace that every normaliser here keeps as whitespace and every pre-tokenizer splits at: Unicode
# White_Space less the control characters in it (BERT's clean_text deletes \x0b, \x0c and \x85).
SEPARATORS = " \t\n\r\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# The ideographs BERT's normaliser puts spaces around (handle_chinese_chars), its own ranges; the first
# three (the BMP) are cut points too. A class of BMP characters only is a bitmap to the regex engine,
# which scans ~5x faster than through a list of ranges.
CJK = ("\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
       "\U0002b740-\U0002b81f\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f")
CJK_BMP = CJK[:9]
# Punctuation beyond ASCII that a text may be cut after, where the tokenizer splits each off (checked
# per tokenizer: punctuation added to Unicode after the tokenizers library's tables is not split).
MORE_PUNCTUATION = ("\u00a1\u00a7\u00ab\u00b6\u00b7\u00bb\u00bf\u2010-\u2027\u2030-\u205e\u3001-\u3003"
                    "\u3008-\u3011\u3014-\u301f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65")
# Characters that never end a word under BERT's pre-tokenizer: letters and numbers (Python's \w, less
# "_" and, where the normaliser splits them off, CJK ideographs), combining marks, emoji and regional
# indicators. tests/test_hostile.py checks every one against the tokenizers library.
WORD_CHARS = ("\\w\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f"
              "\U0001f1e6-\U0001f1ff\U0001f300-\U0001f6ff\U0001f900-\U0001faff")
# Characters a normaliser may delete (controls and formats under clean_text, U+FFFD, nonspacing marks
# under strip_accents): each is checked per tokenizer.
MAYBE_DELETED = ("\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e"
                 "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ufffd"
                 "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f")
# Characters that decompose into a combining character other than a nonspacing mark: the only ones
# canonical reordering can move past an accent that strip_accents then removes (Unicode 14; the test
# recomputes the list).
REORDERABLE = ("\u1715\u1734\u1b44\u1baa\u1bf2-\u1bf3\u302e-\u302f\ua953\ua9c0\U000111c0\U00011235\U0001134d"
               "\U000116b6\U0001193d\U00016ff0-\U00016ff1\U0001d15e-\U0001d166\U0001d16d-\U0001d172"
               "\U0001d1bb-\U0001d1c0")
_REORDERABLE = re.compile(f"[{REORDERABLE}]")
_SEPARATOR = re.compile(f"[{SEPARATORS}]")


def expand(ranges: str) -> list[str]:
    """The characters of a regular-expression class body made of single characters and ``a-b`` ranges."""
    out, i = [], 0
    while i < len(ranges):
        if i + 2 < len(ranges) and ranges[i + 1] == "-":
            out += [chr(c) for c in range(ord(ranges[i]), ord(ranges[i + 2]) + 1)]
            i += 3
        else:
            out.append(ranges[i])
            i += 1
    return out


def _char_class(chars) -> str:
    """A regular-expression class body for ``chars``, consecutive code points as ranges."""
    ranges: list[list[int]] = []
    for c in sorted(map(ord, chars)):
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)


class LongTexts:
    """Shortens long texts for one tokenizer without changing their first ``max_seq_length`` tokens.

    ``prefix(text, chars)`` is the text up to the first cut point at or after ``chars`` characters:
    after whitespace, and with BERT's pre-tokenizer after punctuation and CJK ideographs (each a word
    of its own). Its tokens are the first tokens of the whole text, so where they fill max_seq_length
    they are the tokens truncation keeps (``TextTokenizer.encode_ids`` checks, and otherwise takes a
    prefix four times longer).

    ``squeeze(text)`` rewrites a text into one with every token the same, by two regular-expression passes:

    - a run of whitespace and of characters the normaliser deletes becomes one space, or, with no
      whitespace in it, its first character: separators produce no token, and a deleted character is
      gone before any word is formed (nonspacing marks only where nothing in the text can be reordered
      past them, ``REORDERABLE``);
    - a run of characters that never end a word (``WORD_CHARS``) longer than ``run_chars`` is cut to
      ``run_chars`` when the normaliser shows those already make more than WordPiece's
      ``max_input_chars_per_word``: the word is one [UNK] either way (BERT's pre-tokenizer only).

    Added tokens keep their matches: none holds whitespace (``words_tokenized_alone``), a cut point or
    deleted character is never one of their characters, and runs are cut only when every added token
    starts and ends with a character that cannot be in a run.
    """

    chars_per_token = 16  # ~3x the characters per WordPiece token of Korean or English prose

    def __init__(self, tok: Tokenizer):
        self.tok, self.norm = tok, tok.normalizer
        self.bert = isinstance(tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
        self.max_word = tok.model.max_input_chars_per_word
        self.run_chars = 4 * (self.max_word + 1)
        added = [t.content for t in tok.get_added_tokens_decoder().values()]
        in_added = set("".join(added))
        cut = [c for c in string.punctuation + "".join(expand(MORE_PUNCTUATION)) if len(self._words(f"a{c}a")) == 3]
        cjk_split = self.bert and len(self._words("a\u4e2da")) == 3  # "a中a": handle_chinese_chars
        cjk_cut = cjk_split and not any(re.match(f"[{CJK}]", c) for c in in_added)
        self.cut_points = re.compile(f"[{SEPARATORS}{_char_class(set(cut if self.bert else []) - in_added)}"
                                     f"{CJK_BMP if cjk_cut else ''}]")
        deleted = {c for c in expand(MAYBE_DELETED) if c not in in_added and self._words(f"a{c}a") == ["aa"]}
        marks = {c for c in deleted if unicodedata.category(c).startswith("M")}
        self.blank = re.compile(f"[{SEPARATORS}{_char_class(deleted - marks)}]{{2,}}")
        self.marks = re.compile(f"[{SEPARATORS}{_char_class(deleted)}]{{2,}}") if marks else None
        # Runs of word characters (and deleted ones), then within them the parts between the \w characters
        # that end a word: two negation-free classes, which the regex engine scans ~50x faster than one
        # alternation.
        self.runs = re.compile(f"[{WORD_CHARS}{_char_class(deleted)}]{{{self.run_chars + 1},}}")
        self.words = re.compile(f"[^_{CJK if cjk_split else ''}]{{{self.run_chars + 1},}}")
        word_char = re.compile(f"[{WORD_CHARS}]")
        if not self.bert or any(len(t) >= self.run_chars or word_char.match(t[0]) or word_char.match(t[-1])
                                for t in added):
            self.runs = None

    def _words(self, text: str) -> list[str]:
        normalized = self.norm.normalize_str(text) if self.norm is not None else text
        return [w for w, _ in self.tok.pre_tokenizer.pre_tokenize_str(normalized)]

    def prefix(self, text: str, chars: int) -> str:
        """``text`` up to the first cut point at or after ``chars`` characters (all of it if none)."""
        if len(text) <= chars:
            return text
        m = self.cut_points.search(text, chars)
        return text if m is None else text[: m.end()]

    def squeeze(self, text: str) -> str:
        """A text with the same tokens as ``text`` (see the class docstring)."""
        # Long words first, then blanks, then (on what is left) deleted accents: each pass is exact on its
        # own, and each shortens what the next must scan.
        if self.runs is not None:
            text = self.runs.sub(self._shorten_run, text)
        text = self.blank.sub(self._blank, text)
        if self.marks is not None and not _REORDERABLE.search(text):
            text = self.marks.sub(self._blank, text)
        return text

    @staticmethod
    def _blank(m: re.Match) -> str:
        return " " if _SEPARATOR.search(m.group()) else m.group()[0]

    def _shorten_run(self, m: re.Match) -> str:
        return self.words.sub(self._shorten_word, m.group())

    def _shorten_word(self, m: re.Match) -> str:
        run = m.group()
        # More than max_input_chars_per_word normalised characters in one word: WordPiece's [UNK]. The
        # normaliser maps characters one by one, so the whole run has at least as many.
        words = self._words(run[: self.run_chars])
        return run[: self.run_chars] if len(words) == 1 and len(words[0]) > self.max_word else run


class TextTokenizer:
    """Tokenizes batches of text into (input_ids, attention_mask) tensors of shape (B, T)."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int, do_lower_case: bool = False):
        self.tokenizer = tokenizer
        self.pad_id = pad_id
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
        present, else WordPiece from ``vocab.txt``."""
        tok_config = files.config
        if files.tokenizer_json is not None:
            text = read_text(files.tokenizer_json, "tokenizer", TOKENIZER_LIMIT)
            try:
                tok = Tokenizer.from_str(text)
            except Exception as e:  # the Rust side raises plain Exception
                raise ConfigError(f"{files.tokenizer_json}: unreadable tokenizer ({e})") from None
        else:
            tok = wordpiece_from_vocab(files.vocab_txt, tok_config)
        pad_token = token_str(tok_config.get("pad_token"), "")
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        if pad_id is None and tok.padding is not None:
            pad_id = tok.padding.get("pad_id")
        if pad_id is None:
            pad_id = fallback_pad_id
        return cls(tok, pad_id, do_lower_case)

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids of the special tokens ([CLS], [SEP], [PAD], ...): transformers' ``all_special_ids``."""
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

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
