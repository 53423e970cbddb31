"""``SentenceEncoder``: runs a sentence-transformers model; reading and loading happen before it.

``from_pretrained`` finds the folder (``hub``), reads it once into a ``ModelFolder`` (``folder``),
builds and fills the modules (``loading``), then the encoder only runs: tokenizer -> transformer
(through a runner, ``runner.ReferenceRunner`` or ``fast.PackedRunner``) -> pooling -> Dense... ->
Normalize, with sentence-transformers' ``encode`` semantics (prompts, truncate_dim, ordering).
"""

from __future__ import annotations

import logging
import operator
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisbert import hub
from minisbert.errors import ConfigError
from minisbert.fast import PackedRunner, check_quantize, fast_forward, to_device
from minisbert.folder import SIMILARITY_FUNCTIONS, ModelFolder, check_length, read_folder
from minisbert.loading import Loaded, check_device, load, parse_dtype
from minisbert.models import ARCHITECTURES
from minisbert.runner import ReferenceRunner, guard_forked_children
from minisbert.save import save as save_folder
from minisbert.tokenizer import check_texts, clean_text
from minisbert.trace import trace as trace_sentences

log = logging.getLogger("minisbert")

# Texts whose token counts are planned into batches at once (the packed path sorts them by tokens).
PLAN_CHUNK = 4096


class SentenceEncoder:
    """Sentence embeddings from a BERT, RoBERTa or DeBERTa-v2 sentence-transformers checkpoint."""

    def __init__(self, folder: ModelFolder, loaded: Loaded, fast: bool | None = None, quantize: str | None = None):
        self.folder = folder  # what the model folder says (modules, pooling, settings, files)
        self.source = str(folder.root)
        # The architecture by name (``arch`` looks the module up): a module object cannot be pickled.
        self.model_type = next(name for name, module in ARCHITECTURES.items() if module is loaded.arch)
        self.model = loaded.model
        self.dense = loaded.dense  # minisbert.dense.Dense modules, applied to the pooled embedding
        self.tokenizer = loaded.tokenizer
        self.pooling = folder.pooling  # PoolingConfig: modes and include_prompt
        self.max_tokens = loaded.max_tokens  # the position table's limit on max_seq_length
        self.max_seq_length = loaded.max_seq_length
        # sentence-transformers' attributes of the same names, from config_sentence_transformers.json.
        self.prompts = dict(folder.settings.prompts)
        self.default_prompt_name = folder.settings.default_prompt_name
        self.similarity_fn_name = folder.settings.similarity_fn_name
        self.truncate_dim = folder.settings.truncate_dim
        self._reference = ReferenceRunner(self.model, self.tokenizer.pad_id, folder.pooling.modes, self.max_tokens)
        self._quantize = check_quantize(quantize, self.device, self.dtype)
        self._said_hooks = False  # the warning that hooks turn int8 off, given once
        self.fast = fast

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        fast: bool | None = None, quantize: str | None = None) -> "SentenceEncoder":
        """Load a local folder (sentence-transformers or plain Hugging Face layout), a short name
        from ``weights/models.json``, or a hub id (downloaded with ``huggingface_hub``).

        ``fast``: run the packed fast path of ``minisbert.fast`` (True), the reference model forward
        (False), or choose automatically (None: fast where supported, unless ``MINISBERT_FAST=0``).

        ``quantize="int8"``: run the transformer's linear layers in int8 (CPU, float32 model, fast path):
        faster and **inexact** (cosine to the fp32 embedding >= 0.99; see docs/performance.md). Never on
        unless asked for here."""
        guard_forked_children()  # loading already uses torch's thread pool
        check_quantize(quantize, check_device(device), parse_dtype(dtype))  # before seconds of loading
        folder = read_folder(hub.resolve(name_or_path, revision=revision, token=token, cache_dir=cache_dir))
        return cls(folder, load(folder, device=device, dtype=dtype), fast=fast, quantize=quantize)

    # -- copying and pickling ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # The packed runner holds oneDNN's prepacked weights (opaque tensors that neither pickle nor
        # copy) and caches; it is rebuilt from the copied model instead, with the same setting.
        state = dict(self.__dict__, _packed=None)
        state["_fast_setting"] = self._packed is not None
        return state

    def __setstate__(self, state: dict) -> None:
        fast = state.pop("_fast_setting")
        self.__dict__.update(state)
        self.fast = fast

    # -- properties --------------------------------------------------------------------------------

    @property
    def arch(self):
        """The architecture's module in ``minisbert.models`` (``bert``, ``roberta``, ``deberta_v2``)."""
        return ARCHITECTURES[self.model_type]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_seq_length(self) -> int:
        """Tokens per text, ``[CLS]``/``[SEP]`` included; longer texts are truncated. The encoder owns
        this value: it is checked here once and handed to the tokenizer."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        value = check_length(value, "max_seq_length")
        if value > self.max_tokens:
            raise ValueError(f"max_seq_length={value} exceeds the {self.max_tokens} positions this model has")
        self._max_seq_length = value
        self.tokenizer.max_seq_length = value

    @property
    def pooled_dim(self) -> int:
        """The width Pooling gives: hidden size times the number of pooling modes."""
        return self.model.config.hidden_size * len(self.folder.pooling.modes)

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
        return self._packed is not None

    @fast.setter
    def fast(self, value: bool | None) -> None:
        if value is None:
            value = self._quantize is not None or \
                os.environ.get("MINISBERT_FAST", "1").strip() not in ("0", "false", "no", "off")
        # Built once per setting; the fused q/k/v (and int8) weights are copies, so set it again after
        # editing weights.
        forward = fast_forward(self.model, quantize=self._quantize) if value else None
        if forward is None and self._quantize:
            why = "fast=False turns off" if not value else f"this model ({type(self.model).__name__}) lacks"
            raise ValueError(f"quantize={self._quantize!r} runs on the fast path, which {why}")
        self._packed = None if forward is None else \
            PackedRunner(forward, self.tokenizer.pad_id, self.folder.pooling.modes, self.max_tokens)

    @property
    def quantize(self) -> str | None:
        """``"int8"`` when the linear layers run quantized (set at ``from_pretrained``), else None: exact."""
        return self._quantize

    @property
    def runner(self) -> ReferenceRunner | PackedRunner:
        """What ``encode`` runs: the packed path when it is on, the reference forward when it is off or
        any hook is attached (hooks see the reference modules, which the packed path does not call)."""
        if self._packed is None or has_hooks(self.model):
            if self._packed is not None and self._quantize and not self._said_hooks:
                log.warning("forward hooks are attached: encode runs the exact float32 reference path, "
                            "not quantize=%r, while they are", self._quantize)
                self._said_hooks = True
            return self._reference
        return self._packed

    # -- encoding ----------------------------------------------------------------------------------

    def embed_ids(self, ids: list[list[int]], normalize: bool = False) -> torch.Tensor:
        """One batch of token ids (``tokenizer.encode_ids``) -> (B, embedding_dim) float32 embeddings, on the
        model's device; each the same whatever else is in the batch."""
        return self.head(self.runner.embed(ids), normalize)

    def head(self, pooled: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The modules after Pooling: (B, C * modes) pooled in the model's dtype -> (B, embedding_dim)
        float32 embeddings, through the Dense modules and then Normalize (or ``normalize``)."""
        for dense in self.dense:
            pooled = dense(pooled)
        emb = pooled.float()
        if self.folder.normalize or normalize:
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
        single = isinstance(sentences, (str, dict))  # a dict is one multimodal input, as in sentence-transformers
        texts = check_texts([sentences] if single else sentences)
        prompt = self.resolve_prompt(prompt, prompt_name)
        if prompt:
            if not self.folder.pooling.include_prompt:
                raise ConfigError(f"{self.source}: the pooling config says include_prompt=false (leave the prompt's "
                                  f"tokens out of the pooling), which minisbert does not implement; "
                                  f"encode without a prompt (prompt='')")
            texts = [prompt + t for t in texts]
        # Surrogates -> U+FFFD here too, for tokenizers that are not ours (KoBERT's SentencePiece).
        texts = [clean_text(t) for t in texts]
        batch_size = positive_int(batch_size, "batch_size")
        truncate_dim = self.truncate_dim if truncate_dim is None else truncate_dim
        truncate_dim = None if truncate_dim is None else positive_int(truncate_dim, "truncate_dim")
        width = min(self.embedding_dim, truncate_dim or self.embedding_dim)
        out = torch.empty((len(texts), width), dtype=torch.float32, device=self.device)
        # Longest first, like sentence-transformers: similar lengths share a batch, less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        if show_progress_bar is None:
            show_progress_bar = len(texts) >= 32 * batch_size and sys.stderr.isatty()
        progress = None
        if show_progress_bar:
            progress = tqdm(total=len(texts), desc="Batches", unit="text")
        # Tokenized one chunk of the longest-first order at a time, so that only one chunk's token ids
        # exist at once (all 100k texts' ids cost ~200 MB of Python lists); a whole number of batches.
        step = -(-PLAN_CHUNK // batch_size) * batch_size
        for start in range(0, len(order), step):
            chunk = order[start: start + step]
            ids = self.tokenizer.encode_ids([texts[i] for i in chunk])
            batches = self.runner.batches(ids, batch_size, self.max_seq_length)
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

    def save(self, path: str | os.PathLike, model_name: str | None = None, create_model_card: bool = True,
             train_datasets: list[str] | None = None, safe_serialization: bool = True) -> None:
        """Write the encoder as a sentence-transformers model folder (``minisbert/save.py``): what
        ``SentenceTransformer(path)`` and ``SentenceEncoder.from_pretrained(path)`` load with the same
        embeddings, with the current weights, dtype, ``max_seq_length``, prompts and settings."""
        save_folder(self, path, model_name=model_name, create_model_card=create_model_card,
                    train_datasets=train_datasets, safe_serialization=safe_serialization)

    save_pretrained = save

    def trace(self, sentences: str | list[str], batch_size: int = 8, normalize_embeddings: bool = False) -> list:
        """Per-sentence ``minisbert.trace.Trace``: tokens, every layer's states, attention maps (and
        DeBERTa-v2's score terms), unpadded, in input order. See ``minisbert/trace.py``."""
        return trace_sentences(self, sentences, batch_size=batch_size, normalize_embeddings=normalize_embeddings)


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


def positive_int(value, name: str) -> int:
    """``value`` as an int (numpy integers too) >= 1; a ValueError naming ``name`` otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
