"""Writing an encoder as a sentence-transformers model folder: ``save(encoder, path)``.

The folder is what ``SentenceTransformer(path)`` loads (and what ``minisbert`` reads back) with the
same embeddings, in the layout every sentence-transformers version since 2.x reads:

    modules.json                       the modules in the order they run
    config_sentence_transformers.json  prompts, default prompt, similarity function, truncate_dim
    sentence_bert_config.json          max_seq_length, do_lower_case
    config.json, model.safetensors     the transformer, under Hugging Face's key names (no ``bert.``
                                       prefix, as ``BertModel.save_pretrained`` writes them)
    tokenizer.json, vocab.txt, ...     the tokenizer files the encoder was loaded from, copied
    1_Pooling/config.json              pooling modes and include_prompt (after a
                                       1_WeightedLayerPooling/ when the model has one)
    2_Dense/config.json, model.safetensors ...   each module after Pooling, in order: Dense,
                                       LayerNorm (config and weights), Normalize (an empty folder)

What is written is the encoder's current state, not its source folder's: weights (after training),
dtype, ``max_seq_length``, prompts, ``default_prompt_name``, ``similarity_fn_name``, ``truncate_dim``.
The transformer's weight names come from the architecture's checkpoint-name table, inverted, so a
saved folder is loaded by the same strict path as a downloaded one. Every file is written to a
temporary name and renamed into place, so an interrupted save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minisbert.io.files import atomic_path, write_atomically
from minisbert.io.folder import KOBERT_SPM_FILE
from minisbert.modules.dense import NAMES as DENSE_NAMES
from minisbert.modules.dense import Dense
from minisbert.modules.layers import LAYER_NORM_NAMES, LAYER_POOLING_NAMES, LayerNorm
from minisbert.modules.pooling import LEGACY_KEYS

# The module class paths written to modules.json: sentence-transformers resolves these in every
# version (the ``sentence_transformers.models`` aliases survive the 6.x package reorganisation).
MODULE_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "KoBertTransformer": "ko_sentence_transformers.models.KoBertTransformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "LayerNorm": "sentence_transformers.models.LayerNorm",
    "Normalize": "sentence_transformers.models.Normalize",
    "WeightedLayerPooling": "sentence_transformers.models.WeightedLayerPooling",
}
# Tokenizer files copied when the source folder has them (what minisbert and transformers read).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", KOBERT_SPM_FILE, "sentencepiece.bpe.model")
# bge-m3's lexical and ColBERT heads (FlagEmbedding's files at the folder's root): minisbert does not
# train them, so a saved fine-tune carries them unchanged, as it carries the pooler.
HEAD_FILES = ("sparse_linear.pt", "colbert_linear.pt")


def save(encoder, path: str | os.PathLike, *, model_name: str | None = None, create_model_card: bool = True,
         train_datasets: list[str] | None = None, safe_serialization: bool = True) -> Path:
    """Write ``encoder`` as a sentence-transformers folder at ``path`` (created if needed); returns it.
    ``safe_serialization=False`` writes ``pytorch_model.bin`` files instead of safetensors, as
    sentence-transformers does."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    folder = encoder.folder
    kobert = folder.transformer_type == "KoBertTransformer"
    # KoBertTransformer keeps its files in a sub-folder, as ko-sentence-transformers saves it.
    transformer_dir = "0_KoBertTransformer" if kobert else ""
    modules = [{"idx": 0, "name": "0", "path": transformer_dir, "type": MODULE_TYPES[folder.transformer_type]}]

    target = root / transformer_dir
    target.mkdir(exist_ok=True)
    write_json(target / "config.json", hf_config(folder.config, encoder.dtype))
    state = checkpoint_state_dict(encoder.model, encoder.arch)
    # The tensors minisbert does not run (the pooler) go back unchanged, in the model's dtype.
    state.update({key: tensor.to(encoder.dtype).contiguous() for key, tensor in encoder.carried.items()})
    write_weights(target, state, safe_serialization)
    write_json(target / "sentence_bert_config.json",
               {"max_seq_length": encoder.max_seq_length, "do_lower_case": folder.do_lower_case})
    copy_tokenizer_files(Path(folder.tokenizer.folder), target)
    copy_files(Path(folder.root), root, HEAD_FILES)

    def add(kind: str) -> Path:
        idx = len(modules)
        name = f"{idx}_{kind}"
        modules.append({"idx": idx, "name": str(idx), "path": name, "type": MODULE_TYPES[kind]})
        (root / name).mkdir(exist_ok=True)
        return root / name

    if encoder.layer_pooling is not None:
        out, c = add("WeightedLayerPooling"), encoder.layer_pooling.config
        write_json(out / "config.json", {"word_embedding_dimension": c.embedding_dimension,
                                         "layer_start": c.layer_start, "num_hidden_layers": c.num_hidden_layers})
        write_weights(out, checkpoint_state_dict(encoder.layer_pooling, LAYER_POOLING_NAMES), safe_serialization)
    write_json(add("Pooling") / "config.json", pooling_config(encoder.pooling, encoder.model.config.hidden_size))
    for module in encoder.head_modules:
        if isinstance(module, Dense):
            out = add("Dense")
            write_json(out / "config.json", dense_config(module))
            write_weights(out, checkpoint_state_dict(module, DENSE_NAMES), safe_serialization)
        elif isinstance(module, LayerNorm):
            out = add("LayerNorm")
            write_json(out / "config.json", {"dimension": module.config.dimension})
            write_weights(out, checkpoint_state_dict(module, LAYER_NORM_NAMES), safe_serialization)
        else:
            add("Normalize")  # no config and no weights

    write_json(root / "config_sentence_transformers.json", settings(encoder))
    write_json(root / "modules.json", modules)
    if create_model_card:
        write_text(root / "README.md", model_card(encoder, modules, model_name, train_datasets))
    return root


# ---------------------------------------------------------------------------------------------------
# What goes into each file


def checkpoint_state_dict(module: nn.Module, names) -> dict[str, torch.Tensor]:
    """``module``'s tensors under the checkpoint's key names: the architecture's ``CHECKPOINT_NAMES``
    (Hugging Face key -> our name, ``{i}`` for the layer) read backwards. On the CPU, contiguous."""
    table = [(re.compile(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), hf)
             for hf, ours in names.CHECKPOINT_NAMES.items()]
    state = {}
    for name, tensor in module.state_dict().items():
        for pattern, hf in table:
            match = pattern.match(name)
            if match:
                key = hf.replace("{i}", match.group("i")) if "{i}" in hf else hf
                break
        else:  # every parameter is loaded through the table, so each has a name there
            raise KeyError(f"{name!r} has no checkpoint name in {getattr(names, '__name__', 'the name table')}")
        if key in state:
            raise KeyError(f"two parameters map to the checkpoint key {key!r}")
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def hf_config(config: dict, dtype: torch.dtype) -> dict:
    """The transformer's ``config.json`` as read, with the dtype the weights are now written in
    (transformers 5 reads ``dtype``, 4.x ``torch_dtype``)."""
    config = dict(config)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = name
    return config


def pooling_config(pooling, hidden_size: int) -> dict:
    """Pooling's ``config.json``. The legacy boolean keys are read by every sentence-transformers
    version, but they fix the order of concatenation; modes in another order need the list form
    (``pooling_mode``, read since 5.x)."""
    modes = list(pooling.modes)
    legacy_order = [m for m in LEGACY_KEYS.values() if m in modes]
    if modes == legacy_order:
        config = {"word_embedding_dimension": hidden_size}
        config.update({key: mode in modes for key, mode in LEGACY_KEYS.items()})
    else:
        config = {"embedding_dimension": hidden_size, "pooling_mode": modes}
    config["include_prompt"] = pooling.include_prompt
    return config


def dense_config(dense) -> dict:
    c = dense.config
    config = {"in_features": c.in_features, "out_features": c.out_features, "bias": c.bias,
              "activation_function": c.activation_function}
    if c.use_residual:  # omitted at its default, as sentence-transformers does (older versions refuse it)
        config["use_residual"] = True
    return config


def settings(encoder) -> dict:
    """``config_sentence_transformers.json``. No sentence-transformers version is claimed: it would
    make older versions warn that the model comes from a newer one."""
    try:
        version = metadata.version("minisbert")
    except metadata.PackageNotFoundError:
        version = "unknown"
    config = {"__version__": {"minisbert": version, "pytorch": torch.__version__},
              "model_type": "SentenceTransformer",
              "prompts": dict(encoder.prompts),
              "default_prompt_name": encoder.default_prompt_name,
              "similarity_fn_name": encoder.similarity_fn_name}
    if encoder.truncate_dim is not None:
        config["truncate_dim"] = encoder.truncate_dim
    return config


def model_card(encoder, modules: list[dict], model_name: str | None, train_datasets: list[str] | None) -> str:
    name = model_name or Path(encoder.source).name
    lines = [f"# {name}", "",
             f"A sentence-transformers model ({encoder.model_type}, {encoder.get_sentence_embedding_dimension()}-"
             f"dimensional embeddings, max_seq_length {encoder.max_seq_length}), saved by minisbert.", "",
             "Modules: " + " -> ".join(m["type"].rsplit(".", 1)[-1] for m in modules) + "."]
    if train_datasets:
        lines += ["", "Trained on: " + ", ".join(train_datasets) + "."]
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer(PATH)   # or: minisbert.SentenceEncoder.from_pretrained(PATH)",
              "embeddings = model.encode([\"first sentence\", \"second sentence\"])", "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Writing


def write_weights(folder: Path, state: dict[str, torch.Tensor], safe_serialization: bool) -> None:
    if safe_serialization:
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        with atomic_path(folder / "pytorch_model.bin") as tmp:
            torch.save(state, tmp)


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def copy_tokenizer_files(source: Path, target: Path) -> None:
    copy_files(source, target, TOKENIZER_FILES)


def copy_files(source: Path, target: Path, names: tuple[str, ...]) -> None:
    """Each of ``names`` that ``source`` holds, copied into ``target`` atomically."""
    for name in names:
        src, dst = source / name, target / name
        if not src.is_file():
            continue
        if dst.exists() and os.path.samefile(src, dst):  # saved over the folder it was loaded from
            continue
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
