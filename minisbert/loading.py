"""Building what a ``ModelFolder`` describes: the transformer, its Dense modules and the tokenizer.

Every module is built on the meta device (no memory, no random initialisation) and then filled from
its weights file through one strict path, ``fill``: the architecture's checkpoint-name table maps
every key (``io/weights.py``'s ``map_state_dict``), each tensor is cast to the requested device and dtype, and
the values the model will actually use must be finite (a float64 1e39 or an fp32 7e4 loaded as fp16
turns into inf, and every embedding into NaN). Nothing is ever left randomly initialised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from minisbert.checks import DTYPES, check_device, parse_dtype
from minisbert.errors import CheckpointError, ConfigError
from minisbert.io.folder import DenseModule, LayerNormModule, LayerPoolingModule, ModelFolder
from minisbert.io.weights import check_safetensors_header, detect_prefix, map_state_dict, read_state_dict
from minisbert.models import ARCHITECTURES
from minisbert.modules.bge_m3 import COLBERT_FILE, LINEAR_NAMES, SPARSE_FILE, M3Heads
from minisbert.modules.dense import NAMES as DENSE_NAMES
from minisbert.modules.dense import Dense
from minisbert.modules.layers import LAYER_NORM_NAMES, LAYER_POOLING_NAMES, LayerNorm, Normalize, WeightedLayerPooling
from minisbert.text.kobert import KoBertTokenizer
from minisbert.text.tokenizer import TextTokenizer


@dataclass
class Loaded:
    """The pieces of an encoder, ready to run."""
    arch: object  # the architecture's module in minisbert.models
    model: nn.Module  # the transformer, eval mode, no gradients
    dense: list[Dense]
    tokenizer: TextTokenizer | KoBertTokenizer
    max_tokens: int  # the most tokens the position table allows
    max_seq_length: int  # the folder's max_seq_length, capped at max_tokens
    head: list[nn.Module] = field(default_factory=list)  # after Pooling, in order: Dense, LayerNorm, Normalize
    layer_pooling: WeightedLayerPooling | None = None  # between the transformer and Pooling
    # The checkpoint's tensors minisbert does not use but ``save`` writes back (``arch.CARRIED_KEYS``: the
    # pooler), by their key without the prefix, on the CPU as read.
    carried: dict[str, torch.Tensor] = field(default_factory=dict)


def load(folder: ModelFolder, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32) -> Loaded:
    """Build and fill everything ``folder`` describes, on ``device`` in ``dtype`` ("auto": the checkpoint's)."""
    device = check_device(device)
    dtype = checkpoint_dtype(folder) if dtype == "auto" else parse_dtype(dtype)
    arch = architecture(folder)
    model, carried = load_transformer(arch, folder.config, folder.weights, device, dtype)
    limit = arch.max_tokens(model.config)
    if folder.transformer_type == "KoBertTransformer":
        tokenizer = KoBertTokenizer.from_files(folder.tokenizer, folder.do_lower_case)
    else:
        tokenizer = TextTokenizer.from_files(folder.tokenizer, folder.do_lower_case,
                                             fallback_pad_id=model.config.pad_token_id)
    check_token_ids(tokenizer, model.config.vocab_size, folder)
    width = model.config.hidden_size * len(folder.pooling.modes)  # what Pooling gives
    head = []
    for module in folder.head:  # each takes the width the one before gives
        if isinstance(module, DenseModule):
            head.append(load_dense(module, width, device, dtype))
            width = module.config.out_features
        elif isinstance(module, LayerNormModule):
            head.append(load_layer_norm(module, width, device, dtype))
        else:
            head.append(Normalize())
    layer_pooling = None
    if folder.layer_pooling is not None:
        layer_pooling = load_layer_pooling(folder.layer_pooling, model, device, dtype)
    dense = [m for m in head if isinstance(m, Dense)]
    # Like sentence-transformers, never let the tokenizer produce more tokens than positions exist.
    return Loaded(arch, model, dense, tokenizer, limit, min(folder.max_seq_length or limit, limit), head,
                  layer_pooling, carried)


def check_token_ids(tokenizer: TextTokenizer | KoBertTokenizer, vocab_size: int, folder: ModelFolder) -> None:
    """Every id the tokenizer can produce must have a row in the embedding table: an id past it would load
    and then fail with an IndexError at the first text that contains its token."""
    if isinstance(tokenizer, KoBertTokenizer):
        ids, source = tokenizer.vocab, folder.tokenizer.vocab_txt
    else:
        ids = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        source = folder.tokenizer.tokenizer_json or folder.tokenizer.sentencepiece or folder.tokenizer.vocab_txt
    token, top = max(ids.items(), key=lambda kv: kv[1], default=("", -1))
    if tokenizer.pad_id > top:
        token, top = "(padding)", tokenizer.pad_id
    if top >= vocab_size:
        raise ConfigError(f"{source}: token {token!r} has id {top}, but the model has vocab_size={vocab_size} "
                          f"({folder.transformer_dir / 'config.json'}): no embedding for it")


def checkpoint_dtype(folder: ModelFolder) -> torch.dtype:
    """``dtype="auto"``: what the transformer's ``config.json`` names (``dtype``, or ``torch_dtype`` before
    transformers 5), else the weights file's floating dtype, else float32 (transformers' rule)."""
    for key in ("dtype", "torch_dtype"):
        name = folder.config.get(key)
        if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
            return DTYPES[name.removeprefix("torch.")]
    if folder.weights.suffix == ".safetensors":  # the header says, without reading the tensors
        header = check_safetensors_header(folder.weights)
        stored = {SAFETENSORS_DTYPES.get(v.get("dtype")) for k, v in header.items() if k != "__metadata__"}
        stored.discard(None)
        if len(stored) == 1:
            return stored.pop()
    return torch.float32


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def architecture(folder: ModelFolder):
    """The module of ``minisbert.models`` that implements the folder's ``model_type``."""
    # KoBertTransformer always builds a BertModel, whatever config.json says (or omits).
    default = "bert" if folder.transformer_type == "KoBertTransformer" else None
    model_type = folder.config.get("model_type", default)
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ConfigError(f"{folder.transformer_dir / 'config.json'}: model_type={model_type!r} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type]


def load_transformer(arch, hf_config: dict, weights: Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The architecture built from ``hf_config`` and filled from ``weights``, and the tensors of the
    checkpoint that ``save`` carries through (``arch.CARRIED_KEYS``)."""
    state = read_state_dict(weights)
    # Every layer has at least one tensor. Refusing more layers than the file has tensors before
    # building keeps a config asking for 10**9 layers from taking hours, even on the meta device.
    layers = hf_config.get("num_hidden_layers")
    if isinstance(layers, int) and layers > len(state):
        raise CheckpointError(f"{weights}: config.json asks for num_hidden_layers={layers} but the file holds "
                              f"only {len(state)} tensors")
    try:
        model = on_meta(arch.build, hf_config)
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        # A value the architecture's validation did not foresee (a list where a name belongs, a size
        # whose tensor would overflow int64) is still a bad config, not a crash.
        raise ConfigError(f"{weights.parent / 'config.json'}: invalid model config "
                          f"({type(e).__name__}: {e})") from None
    model = fill(model, arch, state, weights, device, dtype)
    prefix = detect_prefix(state, arch)
    carried = {k.removeprefix(prefix): v for k, v in state.items()
               if any(re.fullmatch(p, k.removeprefix(prefix)) for p in arch.CARRIED_KEYS)}
    return model, carried


def load_dense(module: DenseModule, in_features: int, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Dense:
    """A Dense module whose input must be ``in_features`` wide (what the module before it gives)."""
    if module.config.in_features != in_features:
        raise ConfigError(f"{module.folder / 'config.json'}: in_features={module.config.in_features}, but the "
                          f"module before it gives {in_features}")
    dense = on_meta(Dense, module.config)
    return fill(dense, DENSE_NAMES, read_state_dict(module.weights), module.weights, device, dtype)


def load_layer_norm(module: LayerNormModule, width: int, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> LayerNorm:
    if module.config.dimension != width:
        raise ConfigError(f"{module.folder / 'config.json'}: dimension={module.config.dimension}, but the module "
                          f"before it gives {width}")
    norm = on_meta(LayerNorm, module.config)
    return fill(norm, LAYER_NORM_NAMES, read_state_dict(module.weights), module.weights, device, dtype)


def load_layer_pooling(module: LayerPoolingModule, model: nn.Module, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> WeightedLayerPooling:
    """WeightedLayerPooling over ``model``'s hidden states: one weight per layer from ``layer_start`` on."""
    cfg, path = module.config, module.folder / "config.json"
    if cfg.embedding_dimension != model.config.hidden_size:
        raise ConfigError(f"{path}: embedding_dimension={cfg.embedding_dimension}, but the transformer gives "
                          f"{model.config.hidden_size}")
    if cfg.num_hidden_layers != model.config.num_hidden_layers:
        raise ConfigError(f"{path}: num_hidden_layers={cfg.num_hidden_layers}, but the transformer has "
                          f"{model.config.num_hidden_layers} layers")
    pooling = on_meta(WeightedLayerPooling, cfg)
    return fill(pooling, LAYER_POOLING_NAMES, read_state_dict(module.weights), module.weights, device,
                dtype)


def fill(module: nn.Module, names, state: dict[str, torch.Tensor], weights: Path,
         device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Fill a meta-device ``module`` from ``state`` (read from ``weights``) through the name table
    ``names`` (an architecture module, or anything with its ``PREFIXES``/``CHECKPOINT_NAMES``/
    ``IGNORED_KEYS``), strictly; returns it in eval mode without gradients."""
    sources: dict[str, str] = {}  # our name -> the checkpoint's key, for errors a user can grep for
    mapped = map_state_dict(state, names, module, str(weights), sources=sources)
    cast = {}
    for ours, tensor in mapped.items():
        value = tensor.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(value).all()):
            # A NaN or inf weight makes every embedding NaN (or silently wrong): refuse the file instead.
            if bool(torch.isfinite(tensor).all()):  # finite in the file, not in the requested dtype
                why = (f"overflows to infinity in {str(dtype).removeprefix('torch.')} (largest |value| "
                       f"{tensor.abs().max().item():.3g}); load the model in a wider dtype")
            else:
                why = "holds NaN or infinite values"
            raise CheckpointError(f"{weights}: tensor {sources[ours]!r} {why} (minisbert's {ours})")
        cast[ours] = value
    module.load_state_dict(cast, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_m3_heads(folder: ModelFolder, hidden_size: int, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> M3Heads | None:
    """bge-m3's lexical and ColBERT linears (``modules/bge_m3.py``) from ``sparse_linear.pt`` and
    ``colbert_linear.pt`` at the folder's root, where FlagEmbedding reads them; None when neither is
    there. The pickles go through the legacy ``.bin`` reader (checked, ``weights_only``), never a
    plain ``torch.load``."""
    paths = [folder.root / SPARSE_FILE, folder.root / COLBERT_FILE]
    present = [p.exists() for p in paths]
    if not any(present):
        return None
    if not all(present):
        raise CheckpointError(f"{paths[present.index(False)]}: missing (bge-m3's heads come as a pair: "
                              f"{SPARSE_FILE} and {COLBERT_FILE})")
    sparse, colbert = (read_state_dict(p) for p in paths)
    weight = colbert.get("weight")
    if weight is None or weight.dim() != 2:
        raise CheckpointError(f"{paths[1]}: expected an nn.Linear state dict with a 2-d 'weight'")
    heads = on_meta(M3Heads, hidden_size, weight.shape[0])  # the ColBERT width is the file's
    for linear, state, path in ((heads.sparse, sparse, paths[0]), (heads.colbert, colbert, paths[1])):
        fill(linear, LINEAR_NAMES, state, path, device, dtype)
    return heads.eval().requires_grad_(False)


class SkipInit(TorchFunctionMode):
    """Turns ``torch.nn.init``'s initialisers into no-ops. On the meta device they compute nothing
    anyway, but the first ``normal_`` there imports torch's compiler stack (~2 s of a cold start)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def on_meta(build, *args):
    """``build(*args)`` on the meta device with no initialiser run: every parameter is filled later."""
    with torch.device("meta"), SkipInit():
        return build(*args)
