"""Text -> padded id tensors with the ``tokenizers`` library, as sentence-transformers tokenizes.

``tokenizer.json`` is used when present; otherwise a WordPiece tokenizer is rebuilt from
``vocab.txt`` + ``tokenizer_config.json`` exactly as transformers' ``BertTokenizerFast`` converter
builds it. Truncation is ``longest_first`` to ``max_seq_length`` counting ``[CLS]``/``[SEP]``; a batch
is padded to its longest row; token type ids are not produced (every model here uses type 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from minisbert.errors import ConfigError, ModelNotFoundError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _token_str(value, default: str) -> str:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content", default)
    return value if isinstance(value, str) else default


def wordpiece_from_vocab(vocab_path: Path, tok_config: dict) -> Tokenizer:
    """BERT WordPiece from ``vocab.txt``, configured like transformers' BertTokenizerFast."""
    vocab: dict[str, int] = {}
    with open(vocab_path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab.setdefault(line.rstrip("\n"), index)
    unk = _token_str(tok_config.get("unk_token"), "[UNK]")
    cls = _token_str(tok_config.get("cls_token"), "[CLS]")
    sep = _token_str(tok_config.get("sep_token"), "[SEP]")
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
    specials = [_token_str(tok_config.get(k), d) for k, d in
                (("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                 ("sep_token", "[SEP]"), ("mask_token", "[MASK]"))]
    tok.add_special_tokens([s for s in specials if s in vocab])
    return tok


class TextTokenizer:
    """Tokenizes batches of text into (input_ids, attention_mask) tensors of shape (B, T)."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int, max_seq_length: int, do_lower_case: bool = False):
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.do_lower_case = do_lower_case
        tokenizer.no_padding()
        self.max_seq_length = max_seq_length

    @classmethod
    def from_folder(cls, folder: Path, max_seq_length: int | None, do_lower_case: bool,
                    fallback_pad_id: int) -> "TextTokenizer":
        tok_config = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the Rust side raises plain Exception
                raise ConfigError(f"{folder / 'tokenizer.json'}: unreadable tokenizer ({e})") from None
        elif (folder / "vocab.txt").is_file():
            tok = wordpiece_from_vocab(folder / "vocab.txt", tok_config)
        else:
            raise ModelNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.txt with "
                                     f"tokenizer_config.json)")
        pad_token = _token_str(tok_config.get("pad_token"), "")
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        if pad_id is None and tok.padding is not None:
            pad_id = tok.padding.get("pad_id")
        if pad_id is None:
            pad_id = fallback_pad_id
        if max_seq_length is None:
            max_seq_length = tok_config.get("model_max_length")
        return cls(tok, pad_id, max_seq_length, do_lower_case)

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"max_seq_length must be an integer >= 2, got {value!r}")
        self._max_seq_length = value
        self.tokenizer.enable_truncation(max_length=value, strategy="longest_first")

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, truncated, with [CLS]/[SEP]; no padding."""
        if self.do_lower_case:
            texts = [t.strip().lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def pad(self, ids: list[list[int]], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest row: (B, T) input_ids and (B, T) attention_mask (int64)."""
        T = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, row in enumerate(ids):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        return input_ids.to(device), attention_mask.to(device)

    def __call__(self, texts: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.encode_ids(texts), device)
