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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minisbert import checkpoint, hub
from minisbert.dense import load_dense
from minisbert.errors import ConfigError, ModelNotFoundError, UnsupportedModuleError
from minisbert.fast import guard_forked_children, to_device, token_batches
from minisbert.models import ARCHITECTURES
from minisbert.pooling import PoolingConfig, pool
from minisbert.tokenizer import TextTokenizer, clean_text

log = logging.getLogger("minisbert")

# sentence-transformers module types, by the class name at the end of their import path.
# KoBertTransformer (ko_sentence_transformers): a BERT with a SentencePiece tokenizer, see minisbert/kobert.py.
TRANSFORMER_TYPES = ("Transformer", "KoBertTransformer")
POOLING_TYPES = ("Pooling",)
DENSE_TYPES = ("Dense",)
NORMALIZE_TYPES = ("Normalize",)

# A text is padded to its own token count rounded up to this multiple, never to its batch's longest
# text, so its embedding cannot depend on its neighbours: the fused attention kernel's sums are grouped
# by the padded length (bert-base size: up to 4.8e-6 apart between batch sizes 1 and 64 when padding to
# the longest), while rows of equal padded length compute the same bits in any batch. A multiple of 8
# also keeps every GEMM at >= 8 rows, where MKL uses one kernel (1-3, 5-7, 9-11 rows round differently).
PAD_MULTIPLE = 8
# Texts whose token counts are planned into batches at once (the packed path sorts them by tokens).
PLAN_CHUNK = 4096


@dataclass(frozen=True)
class Layout:
    """What a model folder holds, read from its files."""
    transformer_dir: Path
    pooling: PoolingConfig
    normalize: bool
    max_seq_length: int | None
    do_lower_case: bool
    transformer_type: str = "Transformer"  # class name of the first module
    settings: "Settings" = field(default_factory=lambda: Settings())
    dense: tuple[Path, ...] = ()  # folders of the Dense modules between Pooling and Normalize, in order


# sentence-transformers' similarity functions for single-vector embeddings (``model.similarity``).
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
# The prompt names sentence-transformers always knows, empty unless the settings fill them.
DEFAULT_PROMPTS = {"query": "", "document": ""}


@dataclass(frozen=True)
class Settings:
    """``config_sentence_transformers.json``: what changes ``encode``'s result or ``similarity`` beyond the
    modules. sentence-transformers prepends the default prompt to every text and cuts embeddings to
    ``truncate_dim`` without being asked, so ignoring these keys would silently break parity."""
    prompts: dict = field(default_factory=lambda: dict(DEFAULT_PROMPTS))  # name -> text
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    truncate_dim: int | None = None


def read_settings(path: Path) -> Settings:
    """Read and check ``config_sentence_transformers.json`` (missing: the defaults, as sentence-transformers)."""
    if not path.is_file():
        return Settings()
    raw = _read_json(path, "sentence-transformers settings")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    prompts = raw.get("prompts") or {}
    if not (isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())):
        raise ConfigError(f"{path}: prompts={prompts!r} must map prompt names to strings")
    prompts = {**DEFAULT_PROMPTS, **prompts}
    default = raw.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConfigError(f"{path}: default_prompt_name={default!r} is not one of the prompts {list(prompts)}")
    similarity = raw.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITY_FUNCTIONS:
        raise ConfigError(f"{path}: similarity_fn_name={similarity!r} is not one of {SIMILARITY_FUNCTIONS}")
    truncate_dim = raw.get("truncate_dim")
    if truncate_dim is not None and not (type(truncate_dim) is int and truncate_dim >= 1):
        raise ConfigError(f"{path}: truncate_dim={truncate_dim!r} must be a positive integer or null")
    return Settings(prompts, default, similarity, truncate_dim)


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
        transformer_dir, pooling, normalize, dense = folder, PoolingConfig(("mean",)), False, ()
        kinds = ["Transformer"]
    else:
        modules = _read_json(folder / "modules.json", "module list")
        if not isinstance(modules, list) or not all(_module_entry_ok(m) for m in modules):
            raise ConfigError(f"{folder / 'modules.json'}: expected a list of {{'idx': int, 'type': str, "
                              f"'path': str}} objects")
        for module in modules:
            # Paths are joined to the folder, as sentence-transformers joins them; "../x" or "/x" would
            # read another model's files.
            path = os.path.normpath(module.get("path") or ".")
            if os.path.isabs(path) or path.split(os.sep)[0] == "..":
                raise ConfigError(f"{folder / 'modules.json'}: module path {module['path']!r} leads outside "
                                  f"the model folder")
        modules = sorted(modules, key=lambda m: m.get("idx", 0))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        for module, kind in zip(modules, kinds):
            if kind not in TRANSFORMER_TYPES + POOLING_TYPES + DENSE_TYPES + NORMALIZE_TYPES:
                raise UnsupportedModuleError(
                    f"{folder / 'modules.json'}: module {module['type']!r} is not implemented by minisbert "
                    f"(supported: Transformer, KoBertTransformer, Pooling, Dense, Normalize)")
        n_dense = sum(k in DENSE_TYPES for k in kinds)
        in_order = (kinds[:1] and kinds[0] in TRANSFORMER_TYPES
                    and (len(kinds) == 1 or kinds[1] in POOLING_TYPES)
                    and all(k in DENSE_TYPES for k in kinds[2: 2 + n_dense])
                    and all(k in NORMALIZE_TYPES for k in kinds[2 + n_dense: 3 + n_dense])
                    and len(kinds) <= 3 + n_dense)
        if not in_order:
            raise UnsupportedModuleError(f"{folder / 'modules.json'}: module order {kinds} is not "
                                         f"Transformer, Pooling[, Dense...][, Normalize]")
        transformer_dir = folder / modules[0].get("path", "")
        pooling = (read_pooling(folder / modules[1].get("path", "") / "config.json")
                   if len(modules) > 1 else PoolingConfig(("mean",)))
        normalize = kinds[-1] in NORMALIZE_TYPES
        dense = tuple(folder / m.get("path", "") for m, k in zip(modules, kinds) if k in DENSE_TYPES)
    st_config = {}
    for name in ("sentence_bert_config.json", "sentence_xlm-roberta_config.json"):
        if (transformer_dir / name).is_file():
            st_config = _read_json(transformer_dir / name, "sentence-transformers config")
            if not isinstance(st_config, dict):
                raise ConfigError(f"{transformer_dir / name}: expected a JSON object")
            max_seq_length = st_config.get("max_seq_length")
            if max_seq_length is not None and not (type(max_seq_length) is int and max_seq_length >= 2):
                raise ConfigError(f"{transformer_dir / name}: max_seq_length={max_seq_length!r} must be an "
                                  f"integer >= 2")
            break
    return Layout(transformer_dir, pooling, normalize, st_config.get("max_seq_length"),
                  bool(st_config.get("do_lower_case", False)), kinds[0],
                  read_settings(folder / "config_sentence_transformers.json"), dense)


def _module_entry_ok(m) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path", ""), str)
            and type(m.get("idx", 0)) is int)


def read_pooling(path: Path) -> PoolingConfig:
    """``1_Pooling/config.json``; a missing file or a malformed one is an error naming it."""
    if not isinstance(_read_json(path, "pooling config"), dict):
        raise ConfigError(f"{path}: expected a JSON object")
    try:
        return PoolingConfig.from_file(path)
    except TypeError as e:  # e.g. "pooling_mode": 3
        raise ConfigError(f"{path}: invalid pooling config ({e})") from None


class SentenceEncoder:
    """Sentence embeddings from a BERT, RoBERTa or DeBERTa-v2 sentence-transformers checkpoint."""

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer, layout: Layout, arch,
                 source: str = "", dense: list | None = None):
        self.model = model
        self.dense = dense or []  # minisbert.dense.Dense modules, applied to the pooled embedding
        self.tokenizer = tokenizer
        self.layout = layout
        self.arch = arch
        self.source = source
        self._fast_runner = None  # reference path until ``fast`` is set (from_pretrained sets it)
        # sentence-transformers' attributes of the same names, from config_sentence_transformers.json.
        self.prompts = dict(layout.settings.prompts)
        self.default_prompt_name = layout.settings.default_prompt_name
        self.similarity_fn_name = layout.settings.similarity_fn_name
        self.truncate_dim = layout.settings.truncate_dim

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        fast: bool | None = None) -> "SentenceEncoder":
        """Load a local folder (sentence-transformers or plain Hugging Face layout), a short name
        from ``weights/models.json``, or a hub id (downloaded with ``huggingface_hub``).

        ``fast``: run the packed fast path of ``minisbert.fast`` (True), the reference model forward
        (False), or choose automatically (None: fast where supported, unless ``MINISBERT_FAST=0``)."""
        folder = hub.resolve(name_or_path, revision=revision, token=token, cache_dir=cache_dir)
        layout = read_layout(folder)
        hf_config = _read_json(layout.transformer_dir / "config.json", "model config")
        if not isinstance(hf_config, dict):
            raise ConfigError(f"{layout.transformer_dir / 'config.json'}: expected a JSON object")
        kobert = layout.transformer_type == "KoBertTransformer"
        # KoBertTransformer always builds a BertModel, whatever config.json says (or omits).
        model_type = hf_config.get("model_type", "bert" if kobert else None)
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            raise ConfigError(f"{layout.transformer_dir / 'config.json'}: model_type={model_type!r} is not "
                              f"supported (supported: {', '.join(ARCHITECTURES)})")
        arch = ARCHITECTURES[model_type]
        weights = checkpoint.find_weights(layout.transformer_dir)
        model = checkpoint.load_model(arch, hf_config, weights, device=device, dtype=dtype)
        # Like sentence-transformers, never let the tokenizer produce more tokens than positions exist.
        limit = arch.max_tokens(model.config)
        max_seq_length = min(layout.max_seq_length, limit) if layout.max_seq_length else None
        if kobert:
            from minisbert.kobert import KoBertTokenizer

            tokenizer = KoBertTokenizer.from_folder(layout.transformer_dir, max_seq_length, layout.do_lower_case)
        else:
            tokenizer = TextTokenizer.from_folder(layout.transformer_dir, max_seq_length,
                                                  layout.do_lower_case, fallback_pad_id=model.config.pad_token_id)
        encoder = cls(model, tokenizer, layout, arch, source=str(folder))
        for dense_dir in layout.dense:  # each takes the width the one before gives
            encoder.dense.append(load_dense(dense_dir, encoder.embedding_dim, device=device, dtype=dtype))
        encoder.max_seq_length = min(tokenizer.max_seq_length or limit, limit)
        encoder.fast = fast
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
    def pooled_dim(self) -> int:
        """The width Pooling gives: hidden size times the number of pooling modes."""
        return self.model.config.hidden_size * len(self.layout.pooling.modes)

    @property
    def embedding_dim(self) -> int:
        """The width of an embedding: the last Dense module's, else the pooled width."""
        return self.dense[-1].config.out_features if self.dense else self.pooled_dim

    def get_sentence_embedding_dimension(self) -> int:
        """The width ``encode`` returns: ``embedding_dim``, cut to ``truncate_dim`` when that is set."""
        return min(self.embedding_dim, self.truncate_dim or self.embedding_dim)

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def fast(self) -> bool:
        """Whether ``encode`` runs ``minisbert.fast``'s packed path instead of the reference forward."""
        return self._fast_runner is not None

    @fast.setter
    def fast(self, value: bool | None) -> None:
        from minisbert import fast

        if value is None:
            value = os.environ.get("MINISBERT_FAST", "1").strip() not in ("0", "false", "no", "off")
        # Built once per setting; the fused q/k/v weights are copies, so set it again after editing weights.
        self._fast_runner = fast.fast_forward(self.model) if value else None

    # -- encoding ----------------------------------------------------------------------------------

    def padded_length(self, n_tokens: int) -> int:
        """The length a text of ``n_tokens`` tokens is padded to, whatever batch it is in."""
        return min(-(-n_tokens // PAD_MULTIPLE) * PAD_MULTIPLE, max(n_tokens, self.arch.max_tokens(self.model.config)))

    def embed_batch(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        """One batch of texts -> (B, embedding_dim) embeddings in float32, on the model's device."""
        return self.embed_ids(self.tokenizer.encode_ids(texts), normalize)

    def embed_ids(self, ids: list[list[int]], normalize: bool = False) -> torch.Tensor:
        """One batch of token ids (``tokenizer.encode_ids``) -> (B, embedding_dim) float32 embeddings.

        Texts are padded in groups of equal ``padded_length``, so each embedding is the same in any batch.
        The reference path runs group by group; the fast path runs every group's tokens through each
        linear layer at once and attention group by group."""
        # Hooks attach to the reference modules, which the packed fast path does not call.
        runner = None if has_hooks(self.model) else self._fast_runner
        groups: dict[tuple[int, bool], list[int]] = {}
        for b, row in enumerate(ids):
            T = self.padded_length(len(row))
            # The fast path keeps texts of exactly T tokens (passages cut at max_seq_length) in a group of
            # their own: without pads, its padded layout is a view of the packed tokens (``Packing``).
            groups.setdefault((T, runner is not None and len(row) == T), []).append(b)
        # Padded on the host: the fast path builds its token layout there and sends it once.
        padded = [self.tokenizer.pad([ids[b] for b in rows], "cpu", T) for (T, _), rows in groups.items()]
        modes = self.layout.pooling.modes
        if runner is not None:
            pooled = runner.embed(padded, modes)  # (B, C * modes), group after group
            order = to_device(torch.tensor([b for rows in groups.values() for b in rows]), self.device)
            pooled = torch.empty_like(pooled).index_copy_(0, order, pooled)  # back to the order of ``ids``
        else:
            pooled = torch.empty((len(ids), self.pooled_dim), dtype=self.dtype, device=self.device)
            for rows, (input_ids, attention_mask) in zip(groups.values(), padded):  # each (b, T)
                input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
                states = self.model(input_ids, attention_mask)  # (b, T, C)
                pooled[rows] = pool(states, attention_mask, modes)  # (b, C * modes)
        return self.head(pooled, normalize)

    def head(self, pooled: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The modules after Pooling: (B, C * modes) pooled in the model's dtype -> (B, embedding_dim)
        float32 embeddings, through the Dense modules and then Normalize (or ``normalize``)."""
        for dense in self.dense:
            pooled = dense(pooled)
        emb = pooled.float()
        if self.layout.normalize or normalize:
            emb = F.normalize(emb, p=2, dim=1)
        return emb

    @torch.inference_mode()
    def encode(self, sentences: str | list[str], batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True, show_progress_bar: bool | None = None, *,
               prompt_name: str | None = None, prompt: str | None = None, convert_to_tensor: bool = False,
               truncate_dim: int | None = None) -> np.ndarray | torch.Tensor:
        """Embed texts: a list gives (N, D) float32, a single ``str`` gives (D,).

        Results follow the input order whatever the internal batching. ``convert_to_numpy=False`` or
        ``convert_to_tensor=True`` returns a float32 ``torch.Tensor`` on the model's device instead of a
        numpy array. As in sentence-transformers: ``prompt`` (or ``prompts[prompt_name]``, or the
        model's default prompt) is prepended to every text; embeddings are cut to ``truncate_dim``
        (default ``self.truncate_dim``) after the model's Normalize and before ``normalize_embeddings``.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else check_texts(sentences)
        prompt = self.resolve_prompt(prompt, prompt_name)
        if prompt:
            if not self.layout.pooling.include_prompt:
                raise ConfigError(f"{self.source}: the pooling config says include_prompt=false (leave the prompt's "
                                  f"tokens out of the pooling), which minisbert does not implement; "
                                  f"encode without a prompt (prompt='')")
            texts = [prompt + t for t in texts]
        # Surrogates -> U+FFFD here too, for tokenizers that are not ours (KoBERT's SentencePiece).
        texts = [clean_text(t) for t in texts]
        guard_forked_children()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        truncate_dim = self.truncate_dim if truncate_dim is None else truncate_dim
        if truncate_dim is not None and (type(truncate_dim) is not int or truncate_dim < 1):
            raise ValueError(f"truncate_dim must be a positive integer or None, got {truncate_dim!r}")
        width = min(self.embedding_dim, truncate_dim or self.embedding_dim)
        out = torch.empty((len(texts), width), dtype=torch.float32, device=self.device)
        # Longest first, like sentence-transformers: similar lengths share a batch, less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        if show_progress_bar is None:
            show_progress_bar = len(texts) >= 32 * batch_size and sys.stderr.isatty()
        progress = None
        if show_progress_bar:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(texts), desc="Batches", unit="text")
        # Tokenized one chunk of the longest-first order at a time, so that only one chunk's token ids
        # exist at once (all 100k texts' ids cost ~200 MB of Python lists); a whole number of batches.
        step = -(-PLAN_CHUNK // batch_size) * batch_size
        for start in range(0, len(order), step):
            chunk = order[start: start + step]
            ids = self.tokenizer.encode_ids([texts[i] for i in chunk])
            if self._fast_runner is not None:
                # Packed path: longest first by token count, batches filled to a token budget.
                batches = token_batches(ids, batch_size, self.max_seq_length)
            else:
                batches = [range(s, min(s + batch_size, len(chunk))) for s in range(0, len(chunk), batch_size)]
            parts = []  # written into ``out`` once per chunk: on CUDA each indexed write waits for the GPU
            for batch in batches:
                if width == self.embedding_dim:
                    parts.append(self.embed_ids([ids[i] for i in batch], normalize_embeddings))
                else:  # cut after the model's own Normalize, then normalise the cut vectors if asked
                    part = self.embed_ids([ids[i] for i in batch])[:, :width]
                    parts.append(F.normalize(part, p=2, dim=1) if normalize_embeddings else part)
                if progress is not None:
                    progress.update(len(batch))
            rows = torch.tensor([chunk[i] for batch in batches for i in batch])
            out.index_copy_(0, to_device(rows, self.device), torch.cat(parts))
        if progress is not None:
            progress.close()
        if single:
            out = out[0]
        return out.cpu().numpy() if convert_to_numpy and not convert_to_tensor else out

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The text ``encode`` prepends: ``prompt`` if given, else ``prompts[prompt_name]``, else the default
        prompt's, else none; sentence-transformers' rule."""
        if prompt is not None:
            if prompt_name is not None:
                log.warning("both prompt and prompt_name given; prompt_name %r is ignored", prompt_name)
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ValueError(f"prompt name {name!r} is not one of the model's prompts {list(self.prompts)}")
        return self.prompts[name]

    def encode_query(self, sentences: str | list[str], **kwargs) -> np.ndarray | torch.Tensor:
        """``encode`` with the ``"query"`` prompt unless a prompt is given (sentence-transformers' encode_query)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | list[str], **kwargs) -> np.ndarray | torch.Tensor:
        """``encode`` with the first of the ``"document"``, ``"passage"``, ``"corpus"`` prompts the model
        has, unless a prompt is given (sentence-transformers' encode_document)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            kwargs["prompt_name"] = next((n for n in ("document", "passage", "corpus") if n in self.prompts), None)
        return self.encode(sentences, **kwargs)

    def similarity(self, a, b) -> torch.Tensor:
        """(len(a), len(b)) scores of ``similarity_fn_name`` (cosine unless the model's settings say
        ``dot``, ``euclidean`` or ``manhattan``; the distances negated) between two sets of embeddings:
        arrays, tensors, or lists of vectors; a single vector is a set of one. sentence-transformers'
        ``model.similarity``, the same torch operations."""
        a, b = as_embedding_batch(a), as_embedding_batch(b)
        name = self.similarity_fn_name
        if name == "cosine":
            return torch.mm(F.normalize(a, p=2, dim=-1), F.normalize(b, p=2, dim=-1).transpose(0, 1))
        if name == "dot":
            return torch.mm(a, b.transpose(0, 1))
        if name in ("euclidean", "manhattan"):
            return -torch.cdist(a, b, p=2.0 if name == "euclidean" else 1.0)
        raise ValueError(f"similarity_fn_name={name!r} is not one of {SIMILARITY_FUNCTIONS}")

    def trace(self, sentences: str | list[str], batch_size: int = 8, normalize_embeddings: bool = False) -> list:
        """Per-sentence ``minisbert.trace.Trace``: tokens, every layer's states, attention maps (and
        DeBERTa-v2's score terms), unpadded, in input order. See ``minisbert/trace.py``."""
        from minisbert.trace import trace

        return trace(self, sentences, batch_size=batch_size, normalize_embeddings=normalize_embeddings)


def as_embedding_batch(x) -> torch.Tensor:
    """Embeddings as a (N, D) tensor: numpy arrays are viewed, lists of vectors stacked, half precision
    widened to float32 (a matmul in it would round nearby scores into ties)."""
    if isinstance(x, (list, tuple)):
        x = torch.stack([torch.from_numpy(v) if isinstance(v, np.ndarray) else torch.as_tensor(v) for v in x])
    elif isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    x = torch.as_tensor(x)
    if x.is_floating_point() and torch.finfo(x.dtype).bits < 32:
        x = x.float()
    return x.unsqueeze(0) if x.dim() == 1 else x


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any forward hook or pre-hook is registered on the model's modules."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def check_texts(sentences) -> list[str]:
    """A list of ``str`` (any sequence or iterable of them); anything else raises TypeError."""
    if isinstance(sentences, (bytes, bytearray)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences must be a str or a list of str, got {type(sentences).__name__}")
    texts = list(sentences)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"sentences[{i}] is {type(text).__name__}, expected str")
    return texts
