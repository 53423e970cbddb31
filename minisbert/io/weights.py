"""Reading weights files safely, and mapping their keys strictly to a model's parameter names.

Safetensors are read directly (single file or sharded with ``model.safetensors.index.json``); the
legacy ``pytorch_model.bin`` goes through ``legacy_bin``, which checks it before anything in it is
allocated and reads it only with ``torch.load(weights_only=True)``.

The mapping is strict: every checkpoint key is either mapped by the architecture's name table or
matches one of its deliberately ignored patterns; every parameter is filled; every shape and dtype
is checked; each error names the file, the checkpoint's key and the shapes. ``minisbert.loading``
builds the models and fills them through here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from minisbert.errors import CheckpointError, MinisbertError
from minisbert.io.files import CONFIG_LIMIT, WEIGHTS_LIMIT, atomic_path, parse_json, read_bytes, regular_file
from minisbert.io.legacy_bin import read_torch_bin

log = logging.getLogger("minisbert")

# Safetensors dtype names and their sizes in bytes, for validating a header before trusting it.
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                   "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file (or of every shard an index names), on the CPU."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    return _read_weights_file(path)


def _read_weights_file(path: Path, keep=None) -> dict[str, torch.Tensor]:
    """One weights file (never an index), checked to be a regular file first: a FIFO would block
    ``open`` forever. ``keep(key)``, when given, chooses the tensors to read."""
    try:
        regular_file(path, "weights file", WEIGHTS_LIMIT)
    except MinisbertError as e:
        raise (e if isinstance(e, OSError) else CheckpointError(str(e))) from None
    if path.suffix == ".safetensors":
        return read_safetensors(path, keep)
    state = read_torch_bin(path)
    return state if keep is None else {k: v for k, v in state.items() if keep(k)}


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint: every tensor of every shard the index names (as transformers
    reads them), and of a tensor in two shards the copy in the shard the index names (transformers 5.24
    keeps the later shard's copy, whatever the index says)."""
    try:
        raw = read_bytes(index_path, "shard index", CONFIG_LIMIT)
        weight_map = parse_json(raw, str(index_path), "shard index").get("weight_map")
    except MinisbertError as e:
        raise (e if isinstance(e, OSError) else CheckpointError(str(e))) from None
    except AttributeError:  # the JSON is not an object
        raise CheckpointError(f"{index_path}: the shard index is not a JSON object") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: the shard index's weight_map is {type(weight_map).__name__}, "
                              f"expected an object of tensor name -> shard file")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] is {shard!r}, expected a shard file name")
        # A shard is a file beside the index, and a weights file: never a path elsewhere, and never an
        # index itself (an index naming itself would be read forever).
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(f"{index_path}: shard {shard!r} (of tensor {key!r}) is not a .safetensors or "
                                  f".bin file beside the index")
    state: dict[str, torch.Tensor] = {}
    unindexed: dict[str, str] = {}  # tensor in a shard but not in the index -> that shard
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not os.path.lexists(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard!r} is missing")
        # A tensor the index places in another shard is a stray copy here: skipped, not read.
        tensors = _read_weights_file(shard_path, keep=lambda k, s=shard: weight_map.get(k, s) == s)
        for key, tensor in tensors.items():
            if key not in weight_map:
                if key in unindexed:
                    raise CheckpointError(f"{index_path}: tensor {key!r} is in shards {unindexed[key]!r} and "
                                          f"{shard!r}, and the index names neither")
                unindexed[key] = shard
            state[key] = tensor
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} tensors are not in the shard the index names for "
                              f"them, e.g. {missing[0]!r} (in {weight_map[missing[0]]!r})")
    return state


def check_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header; returns it. Catches truncation and absurd sizes with
    a message naming the problem before the library maps any memory."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: safetensors header claims {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header ({type(e).__name__}: {e})") from None
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError(f"bad dimension {d!r}")
                numel *= d
            expected = numel * _ST_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from None
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end <= data_len:
            raise CheckpointError(f"{path}: tensor {name!r} claims bytes [{start}, {end}) but the data "
                                  f"section has {data_len} bytes (truncated or corrupted file)")
        if end - start != expected:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - start} bytes, its dtype {dtype} and "
                                  f"shape {shape} need {expected}")
    return header


def read_safetensors(path: Path, keep=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (those ``keep(key)`` accepts, when given), header checked first."""
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if keep is None:
                return f.get_tensors()
            return {k: f.get_tensor(k) for k in f.offset_keys() if keep(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Mapping checkpoint names to ours


def _compile_table(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), ours)
            for hf, ours in table.items()]


def _shorten(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def detect_prefix(state: dict[str, torch.Tensor], arch) -> str:
    """The bare-model prefix the checkpoint's keys carry (``bert.``, ...), or "" when they carry none."""
    return next((p for p in arch.PREFIXES if any(k.startswith(p) for k in state)), "")


def checkpoint_key(ours: str, arch, prefix: str = "") -> str | None:
    """The checkpoint key the name table maps to our parameter ``ours`` (``blocks.1.attn.query.weight``
    -> ``encoder.layer.1.attention.self.query.weight``), with ``prefix``; None when no entry does."""
    for hf, target in arch.CHECKPOINT_NAMES.items():
        m = re.fullmatch(re.escape(target).replace(r"\{i\}", r"(?P<i>\d+)"), ours)
        if m:
            return prefix + (hf.replace("{i}", m.group("i")) if "{i}" in hf else hf)
    return None


def map_state_dict(state: dict[str, torch.Tensor], arch, model: nn.Module, source: str,
                   sources: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's names, strictly. ``arch`` is the architecture module.
    ``sources``, when given, is filled with our parameter name -> the checkpoint key it came from."""
    prefix = detect_prefix(state, arch)
    log.debug("%s: checkpoint prefix %r", source, prefix or "(none)")
    table = _compile_table(arch.CHECKPOINT_NAMES)
    ignored = [re.compile(p + "$") for p in arch.IGNORED_KEYS]
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}

    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if any(p.match(key) for p in ignored):
            continue
        short = key[len(prefix):] if prefix and key.startswith(prefix) else key
        # Checkpoints from TensorFlow-era BERT name LayerNorm parameters gamma/beta.
        short = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", short))
        ours = None
        for pattern, target in table:
            m = pattern.match(short)
            if m:
                ours = target.replace("{i}", m.group("i")) if "{i}" in target else target
                break
        if ours is None or ours not in expected:
            unexpected.append(key)
            continue
        if ours in mapped:
            raise CheckpointError(f"{source}: two checkpoint keys map to {ours!r} (second: {key!r})")
        want = expected[ours]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model "
                                  f"({ours}) needs {tuple(want.shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, a floating-point "
                                  f"weight is needed")
        mapped[ours] = tensor
        if sources is not None:
            sources[ours] = key
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensors (not part of this "
                              f"{type(model).__name__}): {_shorten(sorted(unexpected))}")
    missing = [name for name in expected if name not in mapped]  # in the model's order
    if missing:
        # Named as the checkpoint would name them (what a user can look for in the file), then ours.
        named = [f"{checkpoint_key(name, arch, prefix) or name} (minisbert's {name})" for name in missing]
        raise CheckpointError(f"{source}: {len(missing)} tensors missing from the checkpoint (nothing is "
                              f"ever randomly initialised): {_shorten(named)}")
    return mapped


def convert_to_safetensors(source: Path, target: Path) -> Path:
    """Write the safetensors twin of a (possibly sharded) legacy checkpoint, read safely."""
    state = read_state_dict(Path(source))
    # Tied or sliced tensors share storage, which safetensors refuses: give each its own memory.
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "converted_from": Path(source).name})
    return Path(target)
