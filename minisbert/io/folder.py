"""Reading a model folder, once, into a typed description: ``read_folder(path) -> ModelFolder``.

A sentence-transformers folder is a pipeline written down as files: ``modules.json`` lists the modules
in the order they run (Transformer, Pooling, Dense..., Normalize), each in its own sub-folder with its
own config; ``sentence_bert_config.json`` holds the transformer's ``max_seq_length`` and
``do_lower_case``; ``config_sentence_transformers.json`` the prompts, similarity function and
``truncate_dim``. A plain Hugging Face folder (no ``modules.json``) is read as Transformer + mean
pooling, as sentence-transformers reads it. Between the Transformer and Pooling a WeightedLayerPooling
may sit; after Pooling, any sequence of Dense, LayerNorm and Normalize (the "head", run in order).

Everything here only reads and checks: nothing builds a model or touches weights (``loading`` does),
and every file goes through ``minisbert.files`` (bounded, regular files only). The hub download reads
``modules.json`` through ``read_modules`` too, to know which sub-folders hold weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from minisbert.checks import integer
from minisbert.errors import CheckpointError, ConfigError, ModelNotFoundError, UnsupportedModuleError
from minisbert.io.files import TOKENIZER_LIMIT, read_json
from minisbert.modules.dense import DenseConfig
from minisbert.modules.layers import LayerNormConfig, WeightedLayerPoolingConfig
from minisbert.modules.pooling import PoolingConfig

# KoBertTransformer (ko_sentence_transformers): a BERT with a SentencePiece tokenizer, see minisbert/text/kobert.py.
TRANSFORMER_TYPES = ("Transformer", "KoBertTransformer")
HEAD_KINDS = ("Dense", "LayerNorm", "Normalize")  # the modules that may follow Pooling, in any order
KINDS = TRANSFORMER_TYPES + ("WeightedLayerPooling", "Pooling") + HEAD_KINDS


def _class_paths(kind: str, module_file: str, *packages: str) -> dict[str, str]:
    """The spellings of one sentence-transformers class in modules.json -> ``kind``."""
    paths = [f"sentence_transformers.models.{kind}", f"sentence_transformers.models.{kind}.{kind}",
             f"sentence_transformers.{module_file}.{kind}", *(f"sentence_transformers.{p}.{kind}" for p in packages)]
    return dict.fromkeys(paths, kind)


# modules.json ``type`` -> the module it names, matched exactly. sentence-transformers (6.2) imports the
# path and takes its last name: ``sentence_transformers.models.X`` (what models saved before 6.x carry,
# now a deprecated alias; also as ``models.X.X``, the class in its old module file), the module file
# where 6.x defines the class (what it writes when saving), and the packages that re-export it. A path
# outside sentence_transformers (``some_pkg.custom.Pooling``) is someone else's code, which
# sentence-transformers runs only with trust_remote_code; any other path it cannot import, or imports
# as another class. Both are refused, whatever their last name. tests/test_hostile.py resolves every
# entry with sentence-transformers' own import_module_class.
MODULE_TYPES = {
    **_class_paths("Transformer", "base.modules.transformer", "base.modules", "sentence_transformer.modules"),
    **_class_paths("Pooling", "sentence_transformer.modules.pooling", "sentence_transformer.modules"),
    **_class_paths("Dense", "base.modules.dense", "base.modules", "sentence_transformer.modules"),
    # 5.x defined Normalize in sentence_transformer/modules/normalize.py (a deprecated alias in 6.x).
    **_class_paths("Normalize", "base.modules.normalize", "base.modules", "sentence_transformer.modules",
                   "sentence_transformer.modules.normalize"),
    **_class_paths("LayerNorm", "sentence_transformer.modules.layer_norm", "sentence_transformer.modules"),
    **_class_paths("WeightedLayerPooling", "sentence_transformer.modules.weighted_layer_pooling",
                   "sentence_transformer.modules"),
    # ko-sentence-transformers' class, in its module file of the same name (as sentence-transformers 2.x wrote it).
    "ko_sentence_transformers.models.KoBertTransformer": "KoBertTransformer",
    "ko_sentence_transformers.models.KoBertTransformer.KoBertTransformer": "KoBertTransformer",
}

# The weights files of a module folder, preferred in this order (safetensors before the legacy pickle).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# The SentencePiece model KoBertTokenizer.from_pretrained looks for.
KOBERT_SPM_FILE = "tokenizer_78b3253a26.model"
# The SentencePiece model of XLM-RoBERTa folders without tokenizer.json (``text/sentencepiece.py``), and
# the tokenizer classes transformers reads it with (CamemBERT's file of the same name maps ids otherwise).
XLMR_SPM_FILE = "sentencepiece.bpe.model"
XLMR_TOKENIZER_CLASSES = ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast")

# sentence-transformers' similarity functions for single-vector embeddings (``model.similarity``).
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
# The prompt names sentence-transformers always knows, empty unless the settings fill them.
DEFAULT_PROMPTS = {"query": "", "document": ""}


@dataclass(frozen=True)
class Module:
    """One entry of ``modules.json``: ``kind`` is the class name (``Pooling``), ``type`` the full path."""
    kind: str
    type: str
    path: str  # relative to the model folder; "" for the folder itself


@dataclass(frozen=True)
class Settings:
    """``config_sentence_transformers.json``: what changes ``encode``'s result or ``similarity`` beyond the
    modules. sentence-transformers prepends the default prompt to every text and cuts embeddings to
    ``truncate_dim`` without being asked, so ignoring these keys would silently break parity."""
    prompts: dict = field(default_factory=lambda: dict(DEFAULT_PROMPTS))  # name -> text
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    truncate_dim: int | None = None


@dataclass(frozen=True)
class TokenizerFiles:
    """What the tokenizer of the transformer module is built from (``text/tokenizer.py`` / ``text/kobert.py``)."""
    folder: Path
    config: dict  # tokenizer_config.json ({} when absent)
    special_tokens_map: dict  # special_tokens_map.json ({} when absent)
    tokenizer_json: Path | None  # the tokenizers library's own file, used when present
    vocab_txt: Path | None  # WordPiece vocabulary (and KoBERT's piece -> id table)
    sentencepiece: Path | None = None  # KoBERT's SentencePiece model, or XLM-R's without tokenizer.json
    added_tokens: dict = field(default_factory=dict)  # added_tokens.json ({} when absent)


@dataclass(frozen=True)
class DenseModule:
    folder: Path
    config: DenseConfig
    weights: Path


@dataclass(frozen=True)
class LayerNormModule:
    folder: Path
    config: LayerNormConfig
    weights: Path


@dataclass(frozen=True)
class NormalizeModule:
    folder: Path


@dataclass(frozen=True)
class LayerPoolingModule:
    """WeightedLayerPooling (``minisbert.modules``), between the Transformer and Pooling."""
    folder: Path
    config: WeightedLayerPoolingConfig
    weights: Path


@dataclass(frozen=True)
class ModelFolder:
    """Everything minisbert needs from a model folder, read and checked."""
    root: Path
    transformer_type: str  # "Transformer" or "KoBertTransformer"
    transformer_dir: Path
    config: dict  # the transformer's config.json, checked by the architecture's own config class
    weights: Path  # the transformer's weights file (or shard index)
    tokenizer: TokenizerFiles
    pooling: PoolingConfig
    dense: tuple[DenseModule, ...]  # between Pooling and Normalize, in order
    normalize: bool
    max_seq_length: int | None  # sentence_bert_config.json's, else tokenizer_config.json's model_max_length
    do_lower_case: bool  # sentence_bert_config.json's: lowercase before tokenizing
    settings: Settings
    # The modules after Pooling in the order they run (Dense, LayerNorm, Normalize); ``dense`` and
    # ``normalize`` above say the same for the common layouts.
    head: tuple[DenseModule | LayerNormModule | NormalizeModule, ...] = ()
    layer_pooling: LayerPoolingModule | None = None


def read_folder(root: str | os.PathLike) -> ModelFolder:
    """Read and check every file of a model folder that decides what ``encode`` computes."""
    root = Path(root)
    modules = read_modules(root) or [Module("Transformer", "Transformer", "")]  # none: a bare HF folder
    kinds = [m.kind for m in modules]
    layer_pooling = kinds[1: 2] == ["WeightedLayerPooling"]
    p = 2 if layer_pooling else 1  # where Pooling sits
    in_order = (kinds[0] in TRANSFORMER_TYPES
                and (len(kinds) == 1 or kinds[p: p + 1] == ["Pooling"])
                and all(k in HEAD_KINDS for k in kinds[p + 1:]))
    if not in_order:
        raise UnsupportedModuleError(f"{root / 'modules.json'}: module order {kinds} is not Transformer"
                                     f"[, WeightedLayerPooling], Pooling[, Dense | LayerNorm | Normalize ...]")
    transformer_dir = root / modules[0].path
    pooling = PoolingConfig(("mean",))  # sentence-transformers' default without a Pooling module
    if len(modules) > 1:
        path = root / modules[p].path / "config.json"
        pooling = PoolingConfig.from_dict(read_json(path, "pooling config"), str(path))
    head = tuple(read_head_module(m.kind, root / m.path) for m in modules[p + 1:])
    normalize = any(isinstance(m, NormalizeModule) for m in head)
    dense = tuple(m for m in head if isinstance(m, DenseModule))

    config_path = transformer_dir / "config.json"
    if not os.path.lexists(config_path):
        raise ModelNotFoundError(f"{config_path}: no config.json: not a sentence-transformers or Hugging Face "
                                 f"model folder")
    config = read_json(config_path, "model config")
    st_config, st_path = {}, None
    for name in ("sentence_bert_config.json", "sentence_xlm-roberta_config.json"):
        if os.path.lexists(transformer_dir / name):
            st_path = transformer_dir / name
            st_config = read_json(st_path, "sentence-transformers config")
            break
    tokenizer = read_tokenizer_files(transformer_dir, kobert=modules[0].kind == "KoBertTransformer")
    max_seq_length = st_config.get("max_seq_length")
    if max_seq_length is not None:
        max_seq_length = check_length(max_seq_length, f"{st_path}: max_seq_length")
    else:
        # transformers writes 1e30 for "no limit"; that, or anything not a length, leaves the limit to
        # the position table (``loading``), as sentence-transformers does.
        value = tokenizer.config.get("model_max_length")
        max_seq_length = value if type(value) is int and 2 <= value < 2**31 else None
    do_lower_case = st_config.get("do_lower_case", False)
    if not isinstance(do_lower_case, bool):
        raise ConfigError(f"{st_path}: do_lower_case={do_lower_case!r} must be true or false")
    return ModelFolder(root, modules[0].kind, transformer_dir, config, find_weights(transformer_dir), tokenizer,
                       pooling, dense, normalize, max_seq_length, do_lower_case,
                       read_settings(root / "config_sentence_transformers.json"), head,
                       read_layer_pooling(root / modules[1].path) if layer_pooling else None)


def check_length(value, what: str) -> int:
    """A token count (``max_seq_length``): an integer (numpy's too) in [2, 2**31); else a ValueError
    (a ConfigError when it comes from a file) naming ``what``."""
    return integer(value, what, 2, 2**31 - 1, error=ConfigError)


def read_modules(root: Path) -> list[Module] | None:
    """The entries of ``modules.json`` in list order (sentence-transformers' order), checked; None when
    the folder has no ``modules.json`` (a plain Hugging Face folder)."""
    path = Path(root) / "modules.json"
    entries = read_json(path, "module list", default=None, expect=list)
    if entries is None:
        return None
    modules = []
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("type"), str)
                and isinstance(entry.get("path", ""), str)):
            raise ConfigError(f"{path}: expected a list of {{'idx': int, 'type': str, 'path': str}} objects, "
                              f"got {entry!r}")
        # No file name holds a NUL byte: refused here, or the first open would raise a bare ValueError.
        for key in ("type", "path"):
            if "\0" in entry.get(key, ""):
                raise ConfigError(f"{path}: module {key} {entry[key]!r} contains a NUL byte")
        # Paths are joined to the folder, as sentence-transformers joins them; "../x" or "/x" would read
        # another model's files.
        rel = os.path.normpath(entry.get("path") or ".")
        if os.path.isabs(rel) or rel.split(os.sep)[0] == "..":
            raise ConfigError(f"{path}: module path {entry['path']!r} leads outside the model folder")
        kind = MODULE_TYPES.get(entry["type"])
        if kind is None:
            raise UnsupportedModuleError(
                f"{path}: module {entry['type']!r} is not implemented by minisbert (supported: sentence-transformers' "
                f"{', '.join(KINDS[:1] + KINDS[2:])} as sentence_transformers.models.<name> or their 6.x module "
                f"paths, and ko_sentence_transformers.models.KoBertTransformer)")
        modules.append(Module(kind, entry["type"], "" if rel == "." else rel))
    if not modules:
        raise ConfigError(f"{path}: the module list is empty")
    return modules


def read_dense(folder: Path) -> DenseModule:
    path = folder / "config.json"
    return DenseModule(folder, DenseConfig.from_dict(read_json(path, "Dense config"), str(path)), find_weights(folder))


def read_head_module(kind: str, folder: Path) -> DenseModule | LayerNormModule | NormalizeModule:
    if kind == "Dense":
        return read_dense(folder)
    if kind == "LayerNorm":
        path = folder / "config.json"
        return LayerNormModule(folder, LayerNormConfig.from_dict(read_json(path, "LayerNorm config"), str(path)),
                               find_weights(folder))
    return NormalizeModule(folder)


def read_layer_pooling(folder: Path) -> LayerPoolingModule:
    path = folder / "config.json"
    config = WeightedLayerPoolingConfig.from_dict(read_json(path, "WeightedLayerPooling config"), str(path))
    return LayerPoolingModule(folder, config, find_weights(folder))


def read_settings(path: Path) -> Settings:
    """Read and check ``config_sentence_transformers.json`` (missing: the defaults, as sentence-transformers)."""
    raw = read_json(path, "sentence-transformers settings", default={})
    prompts = raw.get("prompts") or {}
    if not (isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())):
        raise ConfigError(f"{path}: prompts={prompts!r} must map prompt names to strings")
    prompts = {**DEFAULT_PROMPTS, **prompts}
    default = raw.get("default_prompt_name")
    if default is not None and not (isinstance(default, str) and default in prompts):
        raise ConfigError(f"{path}: default_prompt_name={default!r} is not one of the prompts {list(prompts)}")
    similarity = raw.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITY_FUNCTIONS:
        raise ConfigError(f"{path}: similarity_fn_name={similarity!r} is not one of {SIMILARITY_FUNCTIONS}")
    truncate_dim = raw.get("truncate_dim")
    if truncate_dim is not None and not (type(truncate_dim) is int and truncate_dim >= 1):
        raise ConfigError(f"{path}: truncate_dim={truncate_dim!r} must be a positive integer or null")
    return Settings(prompts, default, similarity, truncate_dim)


def read_tokenizer_files(folder: Path, kobert: bool = False) -> TokenizerFiles:
    """The tokenizer files of a transformer folder: ``tokenizer.json``, XLM-R's ``sentencepiece.bpe.model``
    or ``vocab.txt`` (KoBERT: its SentencePiece model and ``vocab.txt``), with ``tokenizer_config.json`` and
    ``special_tokens_map.json``."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json", "tokenizer config", default={}, limit=TOKENIZER_LIMIT)
    check_tokenizer_config(config, folder / "tokenizer_config.json")
    specials = read_json(folder / "special_tokens_map.json", "special tokens map", default={})
    added = read_json(folder / "added_tokens.json", "added tokens", default={})
    present = {name: folder / name for name in ("tokenizer.json", "vocab.txt") if os.path.lexists(folder / name)}
    spm = None
    if kobert:
        spm = folder / KOBERT_SPM_FILE
        if not os.path.lexists(spm):
            found = sorted(folder.glob("*.model"))
            if len(found) != 1:
                raise ModelNotFoundError(f"{folder}: expected the SentencePiece model {KOBERT_SPM_FILE} "
                                         f"(found {[p.name for p in found] or 'no *.model file'})")
            spm = found[0]
        if "vocab.txt" not in present:
            raise ModelNotFoundError(f"{folder}: missing vocab.txt (KoBERT maps pieces to ids through it)")
    elif not present and os.path.lexists(folder / XLMR_SPM_FILE):
        spm = folder / XLMR_SPM_FILE
        cls = config.get("tokenizer_class")
        if cls is not None and cls not in XLMR_TOKENIZER_CLASSES:
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: tokenizer_class={cls!r} with only {XLMR_SPM_FILE}: "
                              f"minisbert reads that file as {XLMR_TOKENIZER_CLASSES[0]} only")
        if added:
            raise ConfigError(f"{folder / 'added_tokens.json'}: added tokens are not supported with {XLMR_SPM_FILE}")
    elif not present:
        raise ModelNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, {XLMR_SPM_FILE}, or vocab.txt with "
                                 f"tokenizer_config.json)")
    return TokenizerFiles(folder, config, specials, present.get("tokenizer.json"), present.get("vocab.txt"),
                          spm, added)


# tokenizer_config.json keys the tokenizer is built from (``tokenizer.wordpiece_from_vocab``) and the
# values each may take; the special tokens may also be AddedToken objects ({"content": "[UNK]", ...}).
TOKENIZER_FLAGS = {"do_lower_case": (bool,), "tokenize_chinese_chars": (bool,), "strip_accents": (bool, type(None))}
SPECIAL_TOKENS = ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")


def check_tokenizer_config(config: dict, path: Path) -> None:
    """Refuse values the tokenizer cannot be built from, naming the file and key (``"yes"`` for a flag
    otherwise surfaces as a conversion error from the tokenizers library naming neither)."""
    for key, types in TOKENIZER_FLAGS.items():
        if key in config and not isinstance(config[key], types):
            allowed = "true or false" + (" or null" if type(None) in types else "")
            raise ConfigError(f"{path}: {key}={config[key]!r} must be {allowed}")
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(content, str):
            raise ConfigError(f"{path}: {key}={value!r} must be a token string or an AddedToken object with a "
                              f"string content")


def find_weights(folder: Path) -> Path:
    """The weights file of a module folder, preferring safetensors over the legacy pickle format."""
    for name in WEIGHT_FILES:
        if os.path.lexists(folder / name):
            return folder / name
    raise CheckpointError(f"{folder}: no weights file found (looked for {', '.join(WEIGHT_FILES)})")
