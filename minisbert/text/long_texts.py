"""Long texts cut before tokenization, keeping exactly the tokens truncation would keep.

The tokenizers library normalises, splits and tokenizes a whole text before truncating it, keeping
offsets for every byte: 5 MB of Korean without spaces took 65 s and +1.7 GB, to produce [CLS] [UNK]
[SEP]. ``LongTexts`` gives the library a short text with the same first max_seq_length tokens
instead: runs of whitespace squeezed, words too long for WordPiece cut to a length that is still too
long, the text cut at a word boundary. Every step rests on the tokenizer being WordPiece behind
per-character normalisers and a whitespace or BERT pre-tokenizer (``words_tokenized_alone``): no
token of a word depends on another word, and (BERT's pre-tokenizer) a word ends only at whitespace,
punctuation or a CJK ideograph.
"""

from __future__ import annotations

import re
import string
import unicodedata

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece


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
