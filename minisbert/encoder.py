"""``SentenceEncoder``: runs a sentence-transformers model; reading and loading happen before it.

``SentenceEncoder(name)`` (or ``from_pretrained``) finds the folder (``hub``), reads it once into a
``ModelFolder`` (``folder``), builds and fills the modules (``loading``), then the encoder only runs:
tokenizer -> transformer (through a runner: ``runner.ReferenceRunner``, or ``fast/runner.py``'s
``PackedRunner``) -> pooling -> the modules after it (Dense, LayerNorm, Normalize), with
sentence-transformers' ``encode`` semantics. The class is the public surface; its jobs live in
``minisbert/encoding/`` (options and prompts, runners, one ``encode`` call, inference, copies, worker
processes, training).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F

from minisbert.checks import check_device, check_quantize, parse_dtype
from minisbert.encoding import calls, copies, hybrid, inference, options, runners, training, workers
from minisbert.encoding.calls import MISSING, check_encode, convert
from minisbert.encoding.options import from_pretrained_keywords
from minisbert.encoding.training import ModelCardData
from minisbert.errors import ConfigError
from minisbert.fast.runner import PackedRunner
from minisbert.io import hub
from minisbert.io.folder import ModelFolder, read_folder
from minisbert.io.save import save as save_folder
from minisbert.loading import Loaded, load
from minisbert.models import ARCHITECTURES
from minisbert.modules import bge_m3
from minisbert.quantize import quantize_embeddings
from minisbert.runner import ReferenceRunner, guard_forked_children
from minisbert.search import PAIRWISE, SIMILARITY
from minisbert.text.tokenizer import check_texts
from minisbert.trace import trace as trace_sentences


class SentenceEncoder:
    """Sentence embeddings from a BERT, RoBERTa or DeBERTa-v2 sentence-transformers checkpoint."""

    def __init__(self, model_name_or_path: str | os.PathLike, **kwargs):
        """``SentenceTransformer(model_name_or_path, ...)``'s call: the same as ``from_pretrained`` with the
        same keywords, and also sentence-transformers' ``cache_folder`` (``cache_dir``) and
        ``model_kwargs={"torch_dtype": ...}`` (``dtype``); any other keyword is a ValueError naming it."""
        built = type(self).from_pretrained(model_name_or_path, **from_pretrained_keywords(kwargs))
        self.__dict__.update(built.__dict__)  # one loader: the encoder from_pretrained built, adopted

    @classmethod
    def _from_loaded(cls, folder: ModelFolder, loaded: Loaded, fast: bool | None = None,
                     quantize: str | None = None) -> "SentenceEncoder":
        """The encoder of a read folder and its loaded modules (``from_pretrained`` reads and loads them)."""
        encoder = cls.__new__(cls)  # not __init__, which opens a model by name
        encoder.folder = folder  # what the model folder says (modules, pooling, settings, files)
        encoder.source = str(folder.root)
        # The architecture by name (``arch`` looks the module up): a module object cannot be pickled.
        encoder.model_type = next(name for name, module in ARCHITECTURES.items() if module is loaded.arch)
        encoder.model = loaded.model
        encoder.carried = loaded.carried  # checkpoint tensors minisbert does not run (the pooler); save keeps them
        encoder.head_modules = loaded.head  # after Pooling, in order: Dense, LayerNorm, Normalize (nn.Modules)
        encoder.dense = loaded.dense  # the Dense modules among them
        encoder.layer_pooling = loaded.layer_pooling  # WeightedLayerPooling, or None
        encoder.tokenizer = loaded.tokenizer
        encoder.pooling = folder.pooling  # PoolingConfig: modes and include_prompt
        encoder.max_tokens = loaded.max_tokens  # the position table's limit on max_seq_length
        encoder.max_seq_length = loaded.max_seq_length
        # sentence-transformers' attributes of the same names, from config_sentence_transformers.json.
        encoder.prompts = dict(folder.settings.prompts)
        encoder.default_prompt_name = folder.settings.default_prompt_name
        encoder.similarity_fn_name = folder.settings.similarity_fn_name
        encoder.truncate_dim = folder.settings.truncate_dim
        encoder._quantize = check_quantize(quantize, encoder.device, encoder.dtype)
        encoder._said_hooks = False  # the warning that hooks turn int8 off, given once
        encoder.model_card_data = ModelCardData()  # where sentence-transformers' evaluators leave their metrics
        encoder.layer_pooling_active = runners.layer_pooling_active(folder, loaded)
        encoder._reference = runners.reference_runner(folder, loaded)
        encoder.fast = fast
        return encoder

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
        encoder = cls._from_loaded(folder, load(folder, device=device, dtype=dtype), fast=fast, quantize=quantize)
        options.override_settings(encoder, prompts, default_prompt_name, similarity_fn_name, truncate_dim)
        return encoder

    # -- copying, pickling, moving (``encoding.copies``, ``encoding.copies``) --------------------------

    def __getstate__(self) -> dict:
        return copies.getstate(self)

    def __setstate__(self, state: dict) -> None:
        copies.setstate(self, state)

    def pipeline(self) -> list[torch.nn.Module]:
        """The modules in the order they run: the transformer, WeightedLayerPooling if any, the modules
        after Pooling (which has no weights)."""
        return [self.model] + ([self.layer_pooling] if self.layer_pooling is not None else []) + self.head_modules

    def modules(self):
        """Every module and submodule of the pipeline, as ``nn.Module.modules``."""
        return (m for module in self.pipeline() for m in module.modules())

    def parameters(self):
        """Every parameter of the pipeline, as ``nn.Module.parameters``."""
        return (p for module in self.pipeline() for p in module.parameters())

    def eval(self) -> "SentenceEncoder":
        for module in self.pipeline():
            module.eval()
        return self

    def to(self, *args, **kwargs) -> "SentenceEncoder":
        """Move and/or cast every module, as ``nn.Module.to`` (``to("cuda")``, ``to(torch.float16)``,
        ``to("cpu", torch.bfloat16)``); returns the encoder. The packed path is rebuilt for the new
        device and dtype."""
        copies.move(self, *args, **kwargs)
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
        return self.to(copies.cuda_device(device))

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
        self._max_seq_length = self.tokenizer.max_seq_length = options.check_max_seq_length(value, self.max_tokens)

    def get_max_seq_length(self) -> int:
        return self.max_seq_length

    @property
    def similarity_fn_name(self) -> str:
        """``cosine``, ``dot``, ``euclidean`` or ``manhattan``: what ``similarity`` computes."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, value) -> None:
        self._similarity_fn_name = options.check_similarity_fn_name(value)

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

    def truncate_sentence_embeddings(self, truncate_dim: int | None):
        """Within the block, ``encode`` cuts embeddings to ``truncate_dim`` (None: no cut)."""
        return options.truncated(self, truncate_dim)

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
        self._packed = runners.packed_runner(self, value)  # None: on where supported (``encoding.runners``)

    def rebuild_runner(self) -> None:
        """Rebuild the packed path from the current weights. Its fused q/k/v (and int8) weights are
        copies made once, so call this after editing weights in place (training does, through ``mode``);
        ``to()`` and loading do it themselves."""
        self._packed = runners.packed_runner(self, self._packed is not None)

    @property
    def quantize(self) -> str | None:
        """``"int8"`` when the linear layers run quantized (set at ``from_pretrained``), else None: exact."""
        return self._quantize

    @property
    def runner(self) -> ReferenceRunner | PackedRunner:
        """What ``encode`` runs: the packed path when it is on, the reference forward when it is off or
        any hook is attached (hooks see the reference modules, which the packed path does not call)."""
        return runners.current_runner(self)

    @property
    def uses_token_type_ids(self) -> bool:
        """Whether the tokenizer's inputs (``tokenize``) include ``token_type_ids``, as transformers'
        tokenizer class for this folder returns them."""
        return inference.uses_token_type_ids(self.folder.tokenizer.config, self.model_type)

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

    def tokenize(self, texts: str | list[str]) -> dict:
        """The model's inputs for ``texts``, as sentence-transformers' ``tokenize``: ``input_ids``,
        ``token_type_ids`` (where the tokenizer makes them), ``attention_mask`` (B, T) int64, padded
        to the longest text, truncated at ``max_seq_length``, and ``modality`` ("text")."""
        texts = [texts] if isinstance(texts, str) else check_texts(texts)
        return inference.tokenize(self, texts) if texts else {}

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
        call = check_encode(self, sentences, kwargs, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
                            show_progress_bar=show_progress_bar, output_value=output_value, precision=precision,
                            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor,
                            normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim)
        out, where = calls.run(self, call.texts, call.inference(), pool=pool, device=device, chunk_size=chunk_size)
        if len(out) and call.precision not in (None, "float32"):
            out = quantize_embeddings(out, call.precision)
        return convert(out, call, where)

    # -- prompts (``encoding.options``) ----------------------------------------------------------------

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The text ``encode`` prepends: ``prompt`` if given, else ``prompts[prompt_name]``, else the default
        prompt's, else none; sentence-transformers' rule."""
        return options.resolve_prompt(self.prompts, self.default_prompt_name, prompt, prompt_name)

    def prompt_length(self, prompt: str) -> int:
        """The tokens of ``prompt`` at the start of every prompted text: [CLS] and the prompt's own (its
        trailing [SEP] not counted), as sentence-transformers counts what ``include_prompt: false`` skips."""
        return options.prompt_length(self.tokenizer, prompt)

    def encode_query(self, sentences: str | list[str], **kwargs):
        """``encode`` with the ``"query"`` prompt unless a prompt is given (sentence-transformers' encode_query)."""
        return self.encode(sentences, **options.query_keywords(self.prompts, kwargs))

    def encode_document(self, sentences: str | list[str], **kwargs):
        """``encode`` with the first of the ``"document"``, ``"passage"``, ``"corpus"`` prompts the model
        has, unless a prompt is given (sentence-transformers' encode_document)."""
        return self.encode(sentences, **options.document_keywords(self.prompts, kwargs))

    def encode_hybrid(self, sentences: str | list[str], batch_size: int = 32, max_length: int | None = None,
                      return_dense: bool = True, return_sparse: bool = True, return_colbert_vecs: bool = True) -> dict:
        """bge-m3's ``dense_vecs``, ``lexical_weights`` and ``colbert_vecs`` from one forward, as FlagEmbedding's
        ``BGEM3FlagModel.encode`` (``encoding/hybrid.py``); ``max_length`` default: ``max_seq_length``."""
        return hybrid.encode_hybrid(self, sentences, batch_size, max_length, return_dense, return_sparse,
                                    return_colbert_vecs)

    # FlagEmbedding's scores of those outputs (``modules/bge_m3.py``).
    compute_lexical_matching_score = staticmethod(bge_m3.lexical_matching_score)
    colbert_score = staticmethod(bge_m3.colbert_score)

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

    def mode(self, train: bool):
        """A context manager: within the block the trainable modules are in train mode with gradients on
        (``train=True``: dropout as transformers places it), or in eval mode without gradients
        (``train=False``, e.g. to evaluate or save during training; the packed path is rebuilt from the
        current weights first). The modules' previous mode comes back after the block; leaving train
        mode rebuilds the packed path from the trained weights (``encoding.training``)."""
        return training.mode(self, train)

    def embed_for_training(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (n, D) embeddings with gradients, as sentence-transformers' ``forward`` in training:
        tokenized without a prompt, through the reference forward in groups of equal padded length
        (``runner.embed_padded``), pooled, then the modules after Pooling (Dense, Normalize)."""
        return training.embed(self, texts)

    # -- worker processes ----------------------------------------------------------------------------

    def start_multi_process_pool(self, target_devices: list[str] | None = None) -> dict:
        """Start worker processes (``minisbert.encoding.workers``) for ``encode(..., pool=pool)``: one per device
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
        return training.evaluate(self, evaluator, output_path)

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

