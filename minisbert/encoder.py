"""``SentenceEncoder``: a sentence-transformers folder read the way sentence-transformers reads it.

The pipeline is fixed and small: tokenizer -> transformer (our own modules) -> pooling ->
optional L2 normalisation. ``modules.json`` must describe exactly that; any other module type is an
error naming it, never silently skipped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minisbert import checkpoint, hub
from minisbert.errors import ConfigError, ModelNotFoundError, UnsupportedModuleError
from minisbert.models import ARCHITECTURES
from minisbert.pooling import PoolingConfig, pool
from minisbert.tokenizer import TextTokenizer

log = logging.getLogger("minisbert")

# sentence-transformers module types, by the class name at the end of their import path.
TRANSFORMER_TYPES = ("Transformer",)
POOLING_TYPES = ("Pooling",)
NORMALIZE_TYPES = ("Normalize",)


@dataclass(frozen=True)
class Layout:
    """What a model folder holds, read from its files."""
    transformer_dir: Path
    pooling: PoolingConfig
    normalize: bool
    max_seq_length: int | None
    do_lower_case: bool


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: missing {what}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable {what} ({e})") from None


def read_layout(folder: Path) -> Layout:
    """Parse ``modules.json`` (or treat a bare Hugging Face folder as Transformer + mean pooling)."""
    if not (folder / "modules.json").is_file():
        transformer_dir, pooling, normalize = folder, PoolingConfig(("mean",)), False
    else:
        modules = _read_json(folder / "modules.json", "module list")
        if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
            raise ConfigError(f"{folder / 'modules.json'}: expected a list of {{'type', 'path'}} objects")
        modules = sorted(modules, key=lambda m: m.get("idx", 0))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        for module, kind in zip(modules, kinds):
            if kind not in TRANSFORMER_TYPES + POOLING_TYPES + NORMALIZE_TYPES:
                raise UnsupportedModuleError(
                    f"{folder / 'modules.json'}: module {module['type']!r} is not implemented by minisbert "
                    f"(supported: Transformer, Pooling, Normalize)")
        in_order = (kinds[:1] and kinds[0] in TRANSFORMER_TYPES
                    and (len(kinds) == 1 or kinds[1] in POOLING_TYPES)
                    and all(k in NORMALIZE_TYPES for k in kinds[2:3]) and len(kinds) <= 3)
        if not in_order:
            raise UnsupportedModuleError(f"{folder / 'modules.json'}: module order {kinds} is not "
                                         f"Transformer, Pooling[, Normalize]")
        transformer_dir = folder / modules[0].get("path", "")
        pooling = (PoolingConfig.from_file(folder / modules[1].get("path", "") / "config.json")
                   if len(modules) > 1 else PoolingConfig(("mean",)))
        normalize = kinds[-1] in NORMALIZE_TYPES
    st_config = {}
    for name in ("sentence_bert_config.json", "sentence_xlm-roberta_config.json"):
        if (transformer_dir / name).is_file():
            st_config = _read_json(transformer_dir / name, "sentence-transformers config")
            break
    return Layout(transformer_dir, pooling, normalize, st_config.get("max_seq_length"),
                  bool(st_config.get("do_lower_case", False)))


class SentenceEncoder:
    """Sentence embeddings from a BERT, RoBERTa or DeBERTa-v2 sentence-transformers checkpoint."""

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer, layout: Layout, arch,
                 source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout
        self.arch = arch
        self.source = source

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None) -> "SentenceEncoder":
        """Load a local folder (sentence-transformers or plain Hugging Face layout), a short name
        from ``weights/models.json``, or a hub id (downloaded with ``huggingface_hub``)."""
        folder = hub.resolve(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        layout = read_layout(folder)
        hf_config = _read_json(layout.transformer_dir / "config.json", "model config")
        if not isinstance(hf_config, dict):
            raise ConfigError(f"{layout.transformer_dir / 'config.json'}: expected a JSON object")
        model_type = hf_config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ConfigError(f"{layout.transformer_dir / 'config.json'}: model_type={model_type!r} is not "
                              f"supported (supported: {', '.join(ARCHITECTURES)})")
        arch = ARCHITECTURES[model_type]
        weights = checkpoint.find_weights(layout.transformer_dir)
        model = checkpoint.load_model(arch, hf_config, weights, device=device, dtype=dtype)
        tokenizer = TextTokenizer.from_folder(layout.transformer_dir, layout.max_seq_length, layout.do_lower_case,
                                              fallback_pad_id=model.config.pad_token_id)
        encoder = cls(model, tokenizer, layout, arch, source=str(folder))
        # Like sentence-transformers, never let the tokenizer produce more tokens than positions exist.
        limit = arch.max_tokens(model.config)
        encoder.max_seq_length = min(tokenizer.max_seq_length or limit, limit)
        return encoder

    # -- properties --------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_seq_length(self) -> int:
        """Tokens per text, ``[CLS]``/``[SEP]`` included; longer texts are truncated."""
        return self.tokenizer.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.arch.max_tokens(self.model.config)
        if isinstance(value, int) and value > limit:
            raise ValueError(f"max_seq_length={value} exceeds the {limit} positions this model has")
        self.tokenizer.max_seq_length = value

    @property
    def embedding_dim(self) -> int:
        return self.model.config.hidden_size * len(self.layout.pooling.modes)

    # -- encoding ----------------------------------------------------------------------------------

    def embed_batch(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        """One batch of texts -> (B, embedding_dim) embeddings in float32, on the model's device."""
        input_ids, attention_mask = self.tokenizer(texts, self.device)  # (B, T), (B, T)
        states = self.model(input_ids, attention_mask)  # (B, T, C)
        emb = pool(states, attention_mask, self.layout.pooling.modes).float()  # (B, embedding_dim)
        if self.layout.normalize or normalize:
            emb = F.normalize(emb, p=2, dim=1)
        return emb

    @torch.inference_mode()
    def encode(self, sentences: str | list[str], batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True, show_progress_bar: bool | None = None) -> np.ndarray | torch.Tensor:
        """Embed texts: a list gives (N, D) float32, a single ``str`` gives (D,).

        Results follow the input order whatever the internal batching. ``convert_to_numpy=False``
        returns a float32 ``torch.Tensor`` on the model's device instead of a numpy array.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else check_texts(sentences)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        out = torch.empty((len(texts), self.embedding_dim), dtype=torch.float32, device=self.device)
        # Longest first, like sentence-transformers: similar lengths share a batch, less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        starts = range(0, len(texts), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(starts) >= 32 and sys.stderr.isatty()
        if show_progress_bar:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="Batches", unit="batch")
        for start in starts:
            index = order[start: start + batch_size]
            out[index] = self.embed_batch([texts[i] for i in index], normalize_embeddings)
        if single:
            out = out[0]
        return out.cpu().numpy() if convert_to_numpy else out


def check_texts(sentences) -> list[str]:
    """A list of ``str`` (any sequence or iterable of them); anything else raises TypeError."""
    if isinstance(sentences, (bytes, bytearray)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"sentences[{i}] is {type(text).__name__}, expected str")
    return texts
