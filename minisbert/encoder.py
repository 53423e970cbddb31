"""``SentenceEncoder``: runs a sentence-transformers model; reading and loading happen before it.

``from_pretrained`` finds the folder (``hub``), reads it once into a ``ModelFolder`` (``folder``),
builds and fills the modules (``loading``), then the encoder only runs: tokenizer -> transformer
(through a runner, ``runner.ReferenceRunner`` or ``fast.PackedRunner``) -> pooling -> the modules
after it (Dense, LayerNorm, Normalize), with sentence-transformers' ``encode`` semantics: prompts,
truncate_dim, output values, precision, the conversions, a multi-process pool (``minisbert.workers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minisbert import workers
from minisbert.checks import check_device, check_quantize, parse_dtype, positive_int
from minisbert.errors import ConfigError
from minisbert.fast.runner import PackedRunner, fast_forward
from minisbert.io import hub
from minisbert.io.folder import SIMILARITY_FUNCTIONS, ModelFolder, check_length, read_folder
from minisbert.io.save import save as save_folder
from minisbert.loading import Loaded, load
from minisbert.models import ARCHITECTURES
from minisbert.modules.kernels import masked_mean
from minisbert.modules.layers import LayerPooled
from minisbert.modules.pooling import pool as pool_states
from minisbert.quantize import PRECISIONS, quantize_embeddings, to_numpy
from minisbert.runner import ReferenceRunner, embed_padded, guard_forked_children, to_device
from minisbert.search import PAIRWISE, SIMILARITY
from minisbert.text.tokenizer import check_texts, clean_text, pad_ids
from minisbert.trace import trace as trace_sentences

log = logging.getLogger("minisbert")

# Texts whose token counts are planned into batches at once (the packed path sorts them by tokens).
PLAN_CHUNK = 4096
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", None)
MISSING = object()  # ``encode()`` without texts (they may come as ``inputs=``)
# Tokenizer classes whose inputs have no token_type_ids (transformers' ``model_input_names``).
NO_TOKEN_TYPES = ("Roberta", "XLMRoberta", "Camembert", "Bart", "GPT2", "MPNet", "DistilBert", "Longformer")


class SentenceEncoder:
    """Sentence embeddings from a BERT, RoBERTa or DeBERTa-v2 sentence-transformers checkpoint."""

    def __init__(self, folder: ModelFolder, loaded: Loaded, fast: bool | None = None, quantize: str | None = None):
        self.folder = folder  # what the model folder says (modules, pooling, settings, files)
        self.source = str(folder.root)
        # The architecture by name (``arch`` looks the module up): a module object cannot be pickled.
        self.model_type = next(name for name, module in ARCHITECTURES.items() if module is loaded.arch)
        self.model = loaded.model
        self.carried = loaded.carried  # checkpoint tensors minisbert does not run (the pooler); save() keeps them
        self.head_modules = loaded.head  # after Pooling, in order: Dense, LayerNorm, Normalize (nn.Modules)
        self.dense = loaded.dense  # the Dense modules among them
        self.layer_pooling = loaded.layer_pooling  # WeightedLayerPooling, or None
        self.tokenizer = loaded.tokenizer
        self.pooling = folder.pooling  # PoolingConfig: modes and include_prompt
        self.max_tokens = loaded.max_tokens  # the position table's limit on max_seq_length
        self.max_seq_length = loaded.max_seq_length
        # sentence-transformers' attributes of the same names, from config_sentence_transformers.json.
        self.prompts = dict(folder.settings.prompts)
        self.default_prompt_name = folder.settings.default_prompt_name
        self.similarity_fn_name = folder.settings.similarity_fn_name
        self.truncate_dim = folder.settings.truncate_dim
        self._quantize = check_quantize(quantize, self.device, self.dtype)
        self._said_hooks = False  # the warning that hooks turn int8 off, given once
        self.model_card_data = ModelCardData()  # where sentence-transformers' evaluators leave their metrics
        # sentence-transformers' Transformer hands the hidden states on (and WeightedLayerPooling acts on
        # them) only when config.json says output_hidden_states; otherwise the module passes through.
        self.layer_pooling_active = self.layer_pooling is not None and folder.config.get("output_hidden_states") is True
        transformer = LayerPooled(self.model, self.layer_pooling) if self.layer_pooling_active else self.model
        self._reference = ReferenceRunner(transformer, self.tokenizer.pad_id, folder.pooling.modes, self.max_tokens)
        self.fast = fast

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        fast: bool | None = None, quantize: str | None = None, *,
                        prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                        similarity_fn_name: str | None = None, truncate_dim: int | None = None) -> "SentenceEncoder":
        """Load a local folder (sentence-transformers or plain Hugging Face layout), a short name
        from ``weights/models.json``, or a hub id (downloaded with ``huggingface_hub``).

        ``dtype``: a torch dtype or its name (``"float32"``, ``"float16"``, ``"bfloat16"``), or ``"auto"``
        (the checkpoint's own). ``fast``: run the packed fast path of ``minisbert/fast/`` (True), the
        reference model forward (False), or choose automatically (None: fast where supported, unless
        ``MINISBERT_FAST=0``). ``prompts``, ``default_prompt_name``, ``similarity_fn_name``,
        ``truncate_dim``: override the folder's settings as ``SentenceTransformer(...)``'s keywords do
        (given prompts replace saved ones of the same name; the others are kept).

        ``quantize="int8"``: run the transformer's linear layers in int8 (CPU, float32 model, fast path):
        faster and **inexact** (cosine to the fp32 embedding >= 0.99; see docs/performance.md). Never on
        unless asked for here."""
        guard_forked_children()  # loading already uses torch's thread pool
        if quantize is not None:  # checked before seconds of loading ("auto" is checked once loaded)
            check_quantize(quantize, check_device(device), torch.float32 if dtype == "auto" else parse_dtype(dtype))
        folder = read_folder(hub.resolve(name_or_path, revision=revision, token=token, cache_dir=cache_dir))
        encoder = cls(folder, load(folder, device=device, dtype=dtype), fast=fast, quantize=quantize)
        if prompts is not None:
            if not (isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())):
                raise TypeError(f"prompts must map prompt names to strings, got {prompts!r}")
            encoder.prompts.update(prompts)
        if default_prompt_name is not None:
            encoder.default_prompt_name = default_prompt_name
        if encoder.default_prompt_name is not None and encoder.default_prompt_name not in encoder.prompts:
            raise ValueError(f"Default prompt name '{encoder.default_prompt_name}' not found in the configured "
                             f"prompts dictionary with keys {list(encoder.prompts)!r}.")
        if similarity_fn_name is not None:
            encoder.similarity_fn_name = similarity_fn_name
        if truncate_dim is not None:
            encoder.truncate_dim = positive_int(truncate_dim, "truncate_dim")
        return encoder

    # -- copying, pickling, moving -----------------------------------------------------------------

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

    def pipeline(self) -> list[torch.nn.Module]:
        """The modules in the order they run: the transformer, WeightedLayerPooling if any, the modules
        after Pooling (which has no weights)."""
        return [self.model] + ([self.layer_pooling] if self.layer_pooling is not None else []) + self.head_modules

    def modules(self):
        """Every module and submodule of the pipeline, as ``nn.Module.modules``."""
        for module in self.pipeline():
            yield from module.modules()

    def parameters(self):
        """Every parameter of the pipeline, as ``nn.Module.parameters``."""
        for module in self.pipeline():
            yield from module.parameters()

    def eval(self) -> "SentenceEncoder":
        for module in self.pipeline():
            module.eval()
        return self

    def to(self, *args, **kwargs) -> "SentenceEncoder":
        """Move and/or cast every module, as ``nn.Module.to`` (``to("cuda")``, ``to(torch.float16)``,
        ``to("cpu", torch.bfloat16)``); returns the encoder. The packed path is rebuilt for the new
        device and dtype."""
        if self._quantize:  # int8 runs on the CPU in float32: refuse a move before making it
            probe = torch.empty(0, device=self.device, dtype=self.dtype).to(*args, **kwargs)
            check_quantize(self._quantize, probe.device, probe.dtype)
        for module in self.pipeline():
            module.to(*args, **kwargs)
        self.rebuild_runner()
        return self

    def half(self) -> "SentenceEncoder":
        return self.to(torch.float16)

    def float(self) -> "SentenceEncoder":
        return self.to(torch.float32)

    def bfloat16(self) -> "SentenceEncoder":
        return self.to(torch.bfloat16)

    def cpu(self) -> "SentenceEncoder":
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> "SentenceEncoder":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

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

    def get_max_seq_length(self) -> int:
        return self.max_seq_length

    @property
    def similarity_fn_name(self) -> str:
        """``cosine``, ``dot``, ``euclidean`` or ``manhattan``: what ``similarity`` computes."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value) -> None:
        value = getattr(value, "value", value)  # sentence-transformers' SimilarityFunction enum
        if value not in SIMILARITY_FUNCTIONS:
            raise ValueError(f"SentenceEncoder only supports similarity_fn_name in {SIMILARITY_FUNCTIONS}, "
                             f"got {value!r}.")
        self._similarity_fn_name = value

    @property
    def pooled_dim(self) -> int:
        """The width Pooling gives: hidden size times the number of pooling modes."""
        return self.model.config.hidden_size * len(self.pooling.modes)

    @property
    def embedding_dim(self) -> int:
        """The width of an embedding: the last Dense module's, else the pooled width."""
        return self.dense[-1].config.out_features if self.dense else self.pooled_dim

    def get_sentence_embedding_dimension(self) -> int:
        """The width ``encode`` returns: ``embedding_dim``, cut to ``truncate_dim`` when that is set."""
        return min(self.embedding_dim, self.truncate_dim or self.embedding_dim)

    get_embedding_dimension = get_sentence_embedding_dimension

    @contextlib.contextmanager
    def truncate_sentence_embeddings(self, truncate_dim: int | None):
        """Within the block, ``encode`` cuts embeddings to ``truncate_dim`` (None: no cut)."""
        original = self.truncate_dim
        try:
            self.truncate_dim = None if truncate_dim is None else positive_int(truncate_dim, "truncate_dim")
            yield
        finally:
            self.truncate_dim = original

    truncate_embeddings = truncate_sentence_embeddings

    def set_pooling_include_prompt(self, include_prompt: bool) -> None:
        """Whether pooling includes a prompt's tokens (False for INSTRUCTOR-style models)."""
        self.pooling = dataclasses.replace(self.pooling, include_prompt=bool(include_prompt))

    @property
    def fast(self) -> bool:
        """Whether ``encode`` runs the packed path (``minisbert/fast/``) instead of the reference forward."""
        return self._packed is not None

    @fast.setter
    def fast(self, value: bool | None) -> None:
        if value is None:
            value = self._quantize is not None or \
                os.environ.get("MINISBERT_FAST", "1").strip() not in ("0", "false", "no", "off")
        # WeightedLayerPooling needs every layer's states, which only the reference forward records.
        forward = fast_forward(self.model, quantize=self._quantize) if value and not self.layer_pooling_active else None
        if forward is None and self._quantize:
            why = "fast=False turns off" if not value else \
                "WeightedLayerPooling turns off" if self.layer_pooling_active else \
                f"this model ({type(self.model).__name__}) lacks"
            raise ValueError(f"quantize={self._quantize!r} runs on the fast path, which {why}")
        self._packed = None if forward is None else \
            PackedRunner(forward, self.tokenizer.pad_id, self.pooling.modes, self.max_tokens)

    def rebuild_runner(self) -> None:
        """Rebuild the packed path from the current weights. Its fused q/k/v (and int8) weights are
        copies made once, so call this after editing weights in place (training does, through ``mode``);
        ``to()`` and loading do it themselves."""
        self.fast = self.fast

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

    @property
    def uses_token_type_ids(self) -> bool:
        """Whether the tokenizer's inputs (``tokenize``) include ``token_type_ids``, as transformers'
        tokenizer class for this folder returns them."""
        config = self.folder.tokenizer.config
        names = config.get("model_input_names")
        if isinstance(names, list):
            return "token_type_ids" in names
        cls = config.get("tokenizer_class")
        if isinstance(cls, str):
            return cls.removesuffix("Fast").removesuffix("Tokenizer") not in NO_TOKEN_TYPES
        return self.model_type != "roberta"

    # -- encoding ----------------------------------------------------------------------------------

    def embed_ids(self, ids: list[list[int]], normalize: bool = False, skip: int = 0) -> torch.Tensor:
        """One batch of token ids (``tokenizer.encode_ids``) -> (B, embedding_dim) embeddings in the model's
        dtype, on its device; each the same whatever else is in the batch. ``skip``: pool without each
        text's first ``skip`` tokens (a prompt, with ``include_prompt: false``)."""
        pooled = self._reference.embed(ids, skip) if skip else self.runner.embed(ids)
        return self.head(pooled, normalize)

    def head(self, pooled: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The modules after Pooling, in order: (B, C * modes) pooled -> (B, embedding_dim), then unit
        length if ``normalize``; in the model's dtype, as sentence-transformers computes them."""
        for module in self.head_modules:
            pooled = module(pooled)
        return F.normalize(pooled, p=2, dim=1) if normalize else pooled

    def prompt_length(self, prompt: str) -> int:
        """The tokens of ``prompt`` at the start of every prompted text: [CLS] and the prompt's own (its
        trailing [SEP] not counted), as sentence-transformers counts what ``include_prompt: false`` skips."""
        ids = self.tokenizer.encode_ids([prompt])[0]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.special_ids else 0)

    def tokenize(self, texts: str | list[str]) -> dict:
        """The model's inputs for ``texts``, as sentence-transformers' ``tokenize``: ``input_ids``,
        ``token_type_ids`` (where the tokenizer makes them), ``attention_mask`` (B, T) int64, padded
        to the longest text, truncated at ``max_seq_length``, and ``modality`` ("text")."""
        texts = [texts] if isinstance(texts, str) else check_texts(texts)
        if not texts:
            return {}
        input_ids, attention_mask = pad_ids(self.tokenizer.encode_ids(texts), self.tokenizer.pad_id)
        features = {"input_ids": input_ids}
        if self.uses_token_type_ids:
            features["token_type_ids"] = torch.zeros_like(input_ids)  # one segment
        features.update(attention_mask=attention_mask, modality="text")
        return features

    @torch.inference_mode()
    def encode(self, sentences: str | list[str] = MISSING, prompt_name: str | None = None,
               prompt: str | None = None, batch_size: int = 32, show_progress_bar: bool | None = None,
               output_value: str | None = "sentence_embedding", precision: str | None = "float32",
               convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               device: str | torch.device | list | None = None, normalize_embeddings: bool = False,
               truncate_dim: int | None = None, pool: dict | None = None, chunk_size: int | None = None,
               **kwargs):
        """Embed texts, with sentence-transformers' ``encode`` arguments and results.

        A list of texts gives an (N, D) array, a single ``str`` a (D,) vector, in the model's dtype
        (numpy has no bfloat16: float32 then). ``convert_to_tensor=True``: one tensor on the model's
        device; ``convert_to_numpy=False``: a list of per-text tensors. ``output_value``:
        ``"sentence_embedding"``; ``"token_embeddings"`` (a list of (tokens, C) tensors, pads removed);
        ``None`` (per text a dict of every feature). ``precision``: ``"float32"``, or ``"int8"``,
        ``"uint8"``, ``"binary"``, ``"ubinary"`` as ``minisbert.quantize`` (int8 ranges from this call's
        embeddings). ``prompt`` (or ``prompts[prompt_name]``, or the default prompt) is prepended to every
        text. Embeddings are cut to ``truncate_dim`` (default ``self.truncate_dim``) after the model's
        modules, then unit-normalised if ``normalize_embeddings``. ``device``: a device moves the encoder
        there; a list of devices, or a ``pool`` from ``start_multi_process_pool``, encodes in worker
        processes, ``chunk_size`` texts per task. Results follow the input order."""
        if sentences is MISSING:  # sentence-transformers 6 names it ``inputs``
            if "inputs" not in kwargs:
                raise TypeError("encode() missing the texts to embed")
            sentences = kwargs.pop("inputs")
        kwargs.pop("task", None)  # sentence-transformers' Router task: these models have one route
        if kwargs:
            raise ValueError(f"SentenceEncoder.encode() has been called with additional keyword arguments that "
                             f"this model does not use: {list(kwargs)}.")
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value={output_value!r} is not one of {OUTPUT_VALUES}")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"Precision {precision!r} is not supported, must be one of {set(PRECISIONS)}")
        if precision not in (None, "float32") and output_value is None:
            raise ValueError(f"precision={precision!r} quantizes embeddings; output_value=None returns features")
        if convert_to_tensor:
            convert_to_numpy = False
        if output_value != "sentence_embedding":  # per-text tensors or dicts, as given
            convert_to_tensor = convert_to_numpy = False
        batch_size = positive_int(batch_size, "batch_size")
        single = isinstance(sentences, (str, dict))  # a dict is one multimodal input, as in sentence-transformers
        texts = check_texts([sentences] if single else sentences)
        prompt = self.resolve_prompt(prompt, prompt_name)
        truncate_dim = self.truncate_dim if truncate_dim is None else truncate_dim
        truncate_dim = None if truncate_dim is None else positive_int(truncate_dim, "truncate_dim")

        inference = dict(prompt=prompt, batch_size=batch_size, show_progress_bar=show_progress_bar,
                         output_value=output_value, normalize_embeddings=normalize_embeddings,
                         truncate_dim=truncate_dim)
        multi_process = pool is not None or (isinstance(device, list) and len(device) > 0)
        if multi_process:
            out = workers.encode(self, texts, pool=pool, devices=device, chunk_size=chunk_size, **inference)
        else:
            if device is not None and not isinstance(device, list):
                target = torch.empty(0, device=device).device  # canonical: "cpu:0" is "cpu"
                if target != self.device:
                    self.to(target)
            out = self._inference(texts, **inference)

        if len(out) and precision not in (None, "float32"):
            out = quantize_embeddings(out, precision)
        if convert_to_tensor:
            if isinstance(out, torch.Tensor) or len(out):
                out = torch.as_tensor(out)
            else:
                out = torch.tensor([], device="cpu" if multi_process else self.device)
        elif convert_to_numpy:
            if not len(out):
                out = np.array([])
            elif isinstance(out, torch.Tensor):
                out = to_numpy(out)
        else:
            out = list(torch.from_numpy(out) if isinstance(out, np.ndarray) else out)
        return out[0] if single else out

    def _inference(self, texts: list[str], prompt: str, batch_size: int, show_progress_bar: bool | None,
                   output_value: str | None, normalize_embeddings: bool, truncate_dim: int | None):
        """``encode`` before quantizing and converting, in this process: (N, D) embeddings in the model's
        dtype on its device (an empty 1-D tensor for no text), or a list of per-text token embeddings or
        feature dicts. Also what each worker of a pool runs on its chunk."""
        # Surrogates -> U+FFFD here too, for tokenizers that are not ours (KoBERT's SentencePiece).
        prompted = [clean_text(prompt + t) for t in texts]
        skip = self.prompt_length(prompt) if prompt and not self.pooling.include_prompt else 0
        if output_value != "sentence_embedding":
            return self._features(texts, prompted, prompt, batch_size, output_value, truncate_dim, skip)
        if not texts:
            return torch.tensor([], device=self.device)
        width = min(self.embedding_dim, truncate_dim or self.embedding_dim)
        out = torch.empty((len(texts), width), dtype=self.dtype, device=self.device)
        # Longest first, like sentence-transformers: similar lengths share a batch, less padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        if show_progress_bar is None:
            show_progress_bar = len(texts) >= 32 * batch_size and sys.stderr.isatty()
        progress = tqdm(total=len(texts), desc="Batches", unit="text") if show_progress_bar else None
        runner = self._reference if skip else self.runner
        # Tokenized one chunk of the longest-first order at a time, so that only one chunk's token ids
        # exist at once (all 100k texts' ids cost ~200 MB of Python lists); a whole number of batches.
        step = -(-PLAN_CHUNK // batch_size) * batch_size
        for start in range(0, len(order), step):
            chunk = order[start: start + step]
            ids = self.tokenizer.encode_ids([prompted[i] for i in chunk])
            batches = runner.batches(ids, batch_size, self.max_seq_length)
            parts = []  # written into ``out`` once per chunk: on CUDA each indexed write waits for the GPU
            for batch in batches:
                if width == self.embedding_dim:
                    parts.append(self.embed_ids([ids[i] for i in batch], normalize_embeddings, skip))
                else:  # cut after the model's own modules, then normalise the cut vectors if asked
                    part = self.embed_ids([ids[i] for i in batch], skip=skip)[:, :width]
                    parts.append(F.normalize(part, p=2, dim=1) if normalize_embeddings else part)
                if progress is not None:
                    progress.update(len(batch))
            rows = torch.tensor([chunk[i] for batch in batches for i in batch])
            out.index_copy_(0, to_device(rows, self.device), torch.cat(parts))
        if progress is not None:
            progress.close()
        return out

    def _features(self, texts: list[str], prompted: list[str], prompt: str, batch_size: int,
                  output_value: str | None, truncate_dim: int | None, skip: int) -> list:
        """``output_value="token_embeddings"`` or ``None``: the reference forward on sentence-transformers'
        own batches (its order, each padded to its longest text), so that every per-text feature, the
        padded ones included, has the shape sentence-transformers gives."""
        order = np.argsort([-len(t) for t in texts])  # the same call as sentence-transformers' (not stable)
        transformer = self._reference.model  # the model, or the model under WeightedLayerPooling
        prompt_length = self.prompt_length(prompt) if prompt else None
        results = []
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            ids = self.tokenizer.encode_ids([prompted[i] for i in batch])
            input_ids, attention_mask = (t.to(self.device) for t in pad_ids(ids, self.tokenizer.pad_id))
            states = transformer(input_ids, attention_mask)  # (b, T, C)
            emb = self.head(pool_states(states, attention_mask, self.pooling.modes, skip))  # (b, D)
            if truncate_dim is not None:
                emb = emb[:, :truncate_dim]
            for b, row in enumerate(ids):
                if output_value == "token_embeddings":
                    results.append(states[b, :len(row)])
                    continue
                item = {"input_ids": input_ids[b]}
                if self.uses_token_type_ids:
                    item["token_type_ids"] = torch.zeros_like(input_ids[b])
                item.update(attention_mask=attention_mask[b], modality="text")
                if prompt_length is not None:
                    item["prompt_length"] = prompt_length
                item.update(token_embeddings=states[b], sentence_embedding=emb[b])
                results.append(item)
        return [results[k] for k in np.argsort(order)]

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

    def encode_query(self, sentences: str | list[str], **kwargs):
        """``encode`` with the ``"query"`` prompt unless a prompt is given (sentence-transformers' encode_query)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None and "query" in self.prompts:
            kwargs["prompt_name"] = "query"
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | list[str], **kwargs):
        """``encode`` with the first of the ``"document"``, ``"passage"``, ``"corpus"`` prompts the model
        has, unless a prompt is given (sentence-transformers' encode_document)."""
        if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
            kwargs["prompt_name"] = next((n for n in ("document", "passage", "corpus") if n in self.prompts), None)
        return self.encode(sentences, **kwargs)

    # -- training ------------------------------------------------------------------------------------

    def trainable_modules(self) -> list[torch.nn.Module]:
        """What fine-tuning trains: the transformer and the Dense modules after Pooling. Any other module
        with weights (LayerNorm, WeightedLayerPooling) is refused with a ConfigError naming it, since
        ``embed_for_training`` would skip it or leave it untrained."""
        kinds = [type(m).__name__ for m in self.pipeline()[1:]
                 if m not in self.dense and next(m.parameters(), None) is not None]
        if kinds:
            raise ConfigError(f"{self.source}: training a model with {', '.join(kinds)} modules is not "
                              f"implemented (fit trains the transformer and Dense modules)")
        return [self.model, *self.dense]

    @contextlib.contextmanager
    def mode(self, train: bool):
        """Within the block the trainable modules are in train mode with gradients on (``train=True``:
        dropout as transformers places it), or in eval mode without gradients (``train=False``, e.g. to
        evaluate or save during training; the packed path is rebuilt from the current weights first).
        The modules' previous mode comes back after the block; leaving train mode rebuilds the packed
        path from the trained weights."""
        modules = self.trainable_modules()
        before = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
        for m in modules:
            m.train(train).requires_grad_(train)
        if not train:
            self.rebuild_runner()
        try:
            yield self
        finally:
            for m, training, grads in before:
                m.train(training)
                for p, grad in zip(m.parameters(), grads):
                    p.requires_grad_(grad)
            if train:
                self.rebuild_runner()

    def embed_for_training(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (n, D) embeddings with gradients, as sentence-transformers' ``forward`` in training:
        tokenized without a prompt, through the reference forward in groups of equal padded length
        (``runner.embed_padded``), pooled, then the modules after Pooling (Dense, Normalize)."""
        device, modes = self.device, self.pooling.modes

        def run(groups):
            pooled = []
            for input_ids, mask in groups:
                input_ids, mask = input_ids.to(device), mask.to(device)
                states = self.model(input_ids, mask)  # (b, T, C)
                # Mean pooling eagerly on every device (``pool`` compiles it on CUDA, for inference).
                pooled.append(masked_mean(states, mask) if modes == ("mean",) else pool_states(states, mask, modes))
            return torch.cat(pooled)  # (n, C * modes)

        return self.head(embed_padded(self.tokenizer.encode_ids(texts), self.tokenizer.pad_id, self.max_tokens, run))

    # -- worker processes ----------------------------------------------------------------------------

    def start_multi_process_pool(self, target_devices: list[str] | None = None) -> dict:
        """Start worker processes (``minisbert.workers``) for ``encode(..., pool=pool)``: one per device
        (default: every CUDA device, else min(4, cores) CPU workers), each with its share of the cores."""
        return workers.start(self, target_devices)

    @staticmethod
    def stop_multi_process_pool(pool: dict) -> None:
        """Stop the pool's workers; none is left running."""
        workers.stop(pool)

    def encode_multi_process(self, sentences: list[str], pool: dict, **kwargs) -> np.ndarray:
        """sentence-transformers' deprecated name for ``encode(sentences, pool=pool)``."""
        return self.encode(sentences, pool=pool, **kwargs)

    # -- similarity, evaluation, saving ------------------------------------------------------------------

    def similarity(self, a, b) -> torch.Tensor:
        """(len(a), len(b)) scores of ``similarity_fn_name`` (cosine unless the model's settings say
        ``dot``, ``euclidean`` or ``manhattan``; the distances negated) between two sets of embeddings:
        arrays, tensors, or lists of vectors; a single vector is a set of one. sentence-transformers'
        ``model.similarity``, the same torch operations (``minisbert.search``)."""
        return SIMILARITY[self.similarity_fn_name](a, b)

    def similarity_pairwise(self, a, b) -> torch.Tensor:
        """(N,) scores of ``similarity_fn_name`` between ``a[i]`` and ``b[i]``."""
        return PAIRWISE[self.similarity_fn_name](a, b)

    def evaluate(self, evaluator, output_path: str | None = None):
        """Run a sentence-transformers evaluator on this encoder: ``evaluator(self, output_path)``."""
        if output_path is not None:
            os.makedirs(output_path, exist_ok=True)
        return evaluator(self, output_path)

    def save(self, path: str | os.PathLike, model_name: str | None = None, create_model_card: bool = True,
             train_datasets: list[str] | None = None, safe_serialization: bool = True) -> None:
        """Write the encoder as a sentence-transformers model folder (``minisbert/io/save.py``): what
        ``SentenceTransformer(path)`` and ``SentenceEncoder.from_pretrained(path)`` load with the same
        embeddings, with the current weights, dtype, ``max_seq_length``, prompts and settings."""
        save_folder(self, path, model_name=model_name, create_model_card=create_model_card,
                    train_datasets=train_datasets, safe_serialization=safe_serialization)

    save_pretrained = save

    def trace(self, sentences: str | list[str], batch_size: int = 8, normalize_embeddings: bool = False) -> list:
        """Per-sentence ``minisbert.trace.Trace``: tokens, every layer's states, attention maps (and
        DeBERTa-v2's score terms), unpadded, in input order. See ``minisbert/trace.py``."""
        return trace_sentences(self, sentences, batch_size=batch_size, normalize_embeddings=normalize_embeddings)


class ModelCardData:
    """Where sentence-transformers' evaluators record their metrics (``set_evaluation_metrics``)."""

    def __init__(self):
        self.eval_results: list[dict] = []

    def set_evaluation_metrics(self, evaluator, metrics: dict, epoch: int = 0, step: int = 0) -> None:
        self.eval_results.append({"evaluator": type(evaluator).__name__, "metrics": dict(metrics),
                                  "epoch": epoch, "step": step})


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any forward hook or pre-hook is registered on the model's modules."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
