"""XLM-RoBERTa's tokenizer from ``sentencepiece.bpe.model`` alone, built as transformers builds it.

Older XLM-R folders (multilingual-e5 and fine-tunes saved before ``tokenizer.json`` existed) ship only
the SentencePiece model. transformers (5.x) does not run SentencePiece on them: ``XLMRobertaTokenizer``
converts the model into a ``tokenizers`` Unigram once and tokenizes with that, and sentence-transformers
does the same. So minisbert converts it the same way and hands the result to ``TextTokenizer``, which
then tokenizes, truncates and pads exactly as for a ``tokenizer.json`` folder. The conversion
(transformers' ``SentencePieceExtractor`` + ``XLMRobertaConverter.convert_from_spm`` +
``XLMRobertaTokenizer.__init__``):

- ids follow fairseq's dictionary, not SentencePiece's: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
  SentencePiece piece ``i >= 3`` is ``i + 1`` (with its score), ``<mask>`` last. SentencePiece's own first
  three pieces (``<unk>``, ``<s>``, ``</s>``) are dropped; an unknown piece is id 3.
- the text is normalised by the model's precompiled character map (``nmt_nfkc``: NFKC plus
  SentencePiece's own rules), split at whitespace, each word prefixed with ``▁`` (``add_prefix_space``).
- ``<s> $A </s>``; the five special tokens are matched whole in the raw text.

The model file is a protocol buffer (``sentencepiece_model.proto``): the two fields needed (pieces
with their scores and types, and the normaliser's character map) are read here with a small
wire-format reader, so neither the ``sentencepiece`` nor the ``protobuf`` package is needed.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from minisbert.errors import ConfigError
from minisbert.io.files import TOKENIZER_LIMIT, read_bytes

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-start marker
# XLMRobertaTokenizer's special tokens and their defaults (tokenizer_config.json may rename them).
SPECIAL_DEFAULTS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>"}
UNK_ID = 3  # fairseq's <unk>, whatever SentencePiece's unk_id is
# sentencepiece_model.proto's piece types.
NORMAL, UNKNOWN, CONTROL = 1, 2, 3


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint starting at ``at`` and where the next field starts."""
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def read_fields(data: bytes):
    """(field number, wire type, value) of each field of one message: an int for varints, bytes for
    length-delimited fields, raw 4 or 8 bytes for fixed-width ones."""
    at = 0
    while at < len(data):
        key, at = read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = read_varint(data, at)
        elif wire == 2:
            size, at = read_varint(data, at)
            if at + size > len(data):
                raise ValueError(f"field {number} runs past the end of its message")
            value, at = data[at: at + size], at + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if at + width > len(data):
                raise ValueError(f"field {number} runs past the end of its message")
            value, at = data[at: at + width], at + width
        else:  # 3/4 are proto2 groups, which sentencepiece_model.proto does not use
            raise ValueError(f"field {number} has wire type {wire}")
        yield number, wire, value


def read_spm_model(data: bytes) -> tuple[list[tuple[str, float, int]], bytes]:
    """A ``ModelProto``'s pieces as (piece, score, type), in id order, and its normaliser's precompiled
    character map (b"" when the model normalises nothing)."""
    pieces, charsmap = [], b""
    for number, wire, value in read_fields(data):
        if number == 1 and wire == 2:  # repeated SentencePiece pieces
            piece, score, kind = "", 0.0, NORMAL  # proto defaults
            for n, w, v in read_fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind))
        elif number == 3 and wire == 2:  # NormalizerSpec normalizer_spec
            for n, w, v in read_fields(value):
                if n == 2 and w == 2:  # bytes precompiled_charsmap
                    charsmap = v
    return pieces, charsmap


def special_token(value, default: str) -> AddedToken:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict whose flags
    (``lstrip``: eat the spaces before it, ...) transformers keeps; anything else: the default."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value.get(k, False)) for k in ("single_word", "lstrip", "rstrip", "normalized")}
        return AddedToken(value["content"], special=True, **flags)
    return AddedToken(value if isinstance(value, str) else default, normalized=False, special=True)


def xlmr_from_spm(path: Path, specials: dict, add_prefix_space: bool = True) -> Tokenizer:
    """The ``tokenizers`` tokenizer transformers' ``XLMRobertaTokenizer`` builds from the SentencePiece
    model at ``path``; ``specials``: SPECIAL_DEFAULTS' keys -> token (tokenizer_config.json's value: a
    string or an AddedToken dict; missing: the default)."""
    try:
        pieces, charsmap = read_spm_model(read_bytes(path, "SentencePiece model", TOKENIZER_LIMIT))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable SentencePiece model ({e})") from None
    # fairseq's dictionary assumes SentencePiece's default order: <unk>, <s>, </s>, then the pieces.
    if [kind for _, _, kind in pieces[:3]] != [UNKNOWN, CONTROL, CONTROL]:
        raise ConfigError(f"{path}: the first pieces are {[p for p, _, _ in pieces[:3]]}, not SentencePiece's "
                          f"<unk>, <s>, </s>: not an XLM-RoBERTa SentencePiece model")
    added = {k: special_token(specials.get(k), d) for k, d in SPECIAL_DEFAULTS.items()}
    s = {k: t.content for k, t in added.items()}
    # Ids 0-3 are fairseq's specials (scored 0, never produced by the Unigram lattice's pieces), then
    # SentencePiece's pieces from its id 3 on, shifted by one, then <mask>.
    vocab = [(s["bos_token"], 0.0), (s["pad_token"], 0.0), (s["eos_token"], 0.0), (s["unk_token"], 0.0)]
    vocab += [(piece, score) for piece, score, _ in pieces[3:]] + [(s["mask_token"], 0.0)]
    try:
        tok = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
        if charsmap:
            tok.normalizer = normalizers.Precompiled(charsmap)
    except Exception as e:  # the Rust side raises plain Exception
        raise ConfigError(f"{path}: unusable SentencePiece model ({e})") from None
    scheme = "always" if add_prefix_space else "never"
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE,
                                                                          prepend_scheme=scheme)])
    tok.decoder = decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme=scheme)
    # Special tokens in the text stay whole (not normalised, unless the config's AddedToken says so); so
    # do SentencePiece's other control pieces, which transformers registers as extra special tokens
    # (XLM-R has none past </s>).
    controls = [piece for piece, _, kind in pieces[3:] if kind == CONTROL and piece not in s.values()]
    tok.add_special_tokens([*added.values(), *(AddedToken(t, normalized=False, special=True) for t in controls)])
    bos, eos = s["bos_token"], s["eos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=[bos, "$A", eos], pair=[bos, "$A", eos, eos, "$B", eos],
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return tok
