"""Reading weights files safely, and mapping their keys strictly to a model's parameter names.

Safetensors are read directly (single file or sharded with ``model.safetensors.index.json``). The
legacy ``pytorch_model.bin`` is checked before anything in it is allocated (``check_torch_bin``) and
then read only with ``torch.load(weights_only=True)``: a pickle that would construct arbitrary
objects (and so could run code) is refused before anything in it runs.

The mapping is strict: every checkpoint key is either mapped by the architecture's name table or
matches one of its deliberately ignored patterns; every parameter is filled; every shape and dtype
is checked; each error names the file, the checkpoint's key and the shapes. ``minisbert.loading``
builds the models and fills them through here.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from minisbert.errors import CheckpointError, MinisbertError
from minisbert.files import CONFIG_LIMIT, WEIGHTS_LIMIT, parse_json, read_bytes, regular_file

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
# The legacy PyTorch format, checked before torch.load allocates anything
#
# torch.save writes a zip archive (uncompressed: ``<name>/data.pkl``, the pickled state dict, and one
# record ``<name>/data/<key>`` per storage) or, before PyTorch 1.6, a stream of pickles followed by the
# raw storages. The pickle names each storage by (dtype, key, element count) and each tensor by
# (storage, offset, size, stride). torch.load trusts those numbers: it allocates a storage of the
# claimed size, inflates a compressed record to whatever size it says, and a tensor of shape
# (16384, 16384) and stride (0, 0) over a 4-byte storage loads fine and costs 1 GiB once copied. So
# the pickle is first read by ``_Scanner``, which builds nothing but records of those numbers, and
# every number is checked against the file.

# The pickle of a state dict is ~150 bytes per tensor; 4 MiB is 25k+ tensors. Unpickling costs
# memory in proportion to the pickle's size, so it is bounded too.
PICKLE_LIMIT = 4 << 20
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# The storage classes torch.save names in the pickle, and the dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
# dtypes the pickle may name directly (``_rebuild_tensor_v3``, for dtypes without a storage class).
_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")}


@dataclass(frozen=True)
class _Storage:
    """A storage as the pickle declares it: ``numel`` elements of ``dtype``."""
    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


@dataclass(frozen=True)
class _Tensor:
    """A tensor as the pickle declares it: a view of ``storage`` (elements of ``dtype``)."""
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    dtype: torch.dtype


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _rebuild_tensor_v2(storage, offset, size, stride, *rest):
    return _Tensor(storage, offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *rest):
    return _Tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, *rest):
    return data


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and the like while scanning."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# Every global a torch.save'd state dict refers to, mapped to what the scan builds instead: records,
# never tensors, and never anything that runs code.
_SCAN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}


class _Scanner(pickle.Unpickler):
    """Reads torch.save's pickle into ``_Tensor``/``_Storage`` records, allocating no tensor and
    calling nothing outside ``_SCAN_GLOBALS``."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _Storage] = {}
        self.views: list[tuple[_Storage, int, int]] = []  # legacy storage views: (root, offset, numel)

    def find_class(self, module, name):
        found = _SCAN_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}")
        return found

    def persistent_load(self, pid):
        # zip format: ("storage", type, key, location, numel); legacy: the same plus view metadata.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_count(pid[4])):
            raise CheckpointError(f"{self.path}: malformed storage record {pid!r:.200}")
        storage = _Storage(pid[2], pid[1].dtype, pid[4])
        if self.storages.setdefault(storage.key, storage) != storage:
            raise CheckpointError(f"{self.path}: storage {storage.key!r} is declared twice with different sizes")
        if len(pid) == 6 and pid[5] is not None:  # a legacy view of part of the storage
            view = pid[5]
            if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                    and _is_count(view[1]) and _is_count(view[2])):
                raise CheckpointError(f"{self.path}: malformed storage view {view!r:.200}")
            self.views.append((storage, view[1], view[2]))
            storage = _Storage(view[0], storage.dtype, view[2])
        return storage


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value < 2**62


def _scan(data, path: Path) -> tuple[object, _Scanner]:
    scanner = _Scanner(data, path)
    try:
        return scanner.load(), scanner
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the pickle holds objects beyond plain tensors "
                              f"(it could run code), and only weights_only loading is allowed. "
                              f"Detail: {e}") from None
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle raises anything from EOFError to TypeError
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def check_torch_bin(path: Path) -> None:
    """Check a torch.save file against its own numbers before ``torch.load`` allocates anything:
    no compressed record, every storage within the file (and within its record), every tensor
    within its storage, and the state dict a flat dict of tensors. Raises CheckpointError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.load's own test for the zip format
    if is_zip:
        state, scanner, records = _scan_zip(path, size)
    else:
        state, scanner, records = _scan_legacy(path, size)
    total = 0
    for key, storage in scanner.storages.items():
        record = records.get(key)
        if record is None:
            raise CheckpointError(f"{path}: storage {key!r} has no data in the file")
        if storage.nbytes != record:
            raise CheckpointError(f"{path}: storage {key!r} claims {storage.numel} elements of "
                                  f"{str(storage.dtype).removeprefix('torch.')} ({storage.nbytes} bytes), "
                                  f"its record holds {record} bytes")
        total += storage.nbytes
    if total > size:
        raise CheckpointError(f"{path}: the storages claim {total} bytes, more than the file's {size}")
    for root, offset, numel in scanner.views:
        if offset + numel > root.numel:
            raise CheckpointError(f"{path}: a view of storage {root.key!r} reaches element {offset + numel}, "
                                  f"the storage has {root.numel}")
    check_flat_state(state, path)
    for key, tensor in state.items():
        _check_view(tensor, key, path)


def check_flat_state(state, path: Path) -> None:
    """A state dict must map names to tensors; anything else (a training checkpoint's nesting, a
    list, a number) gets a message saying what is there instead."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor, the file holds a "
                              f"{type(state).__name__}")
    for key, value in state.items():
        if isinstance(value, dict):
            raise CheckpointError(
                f"{path}: the weights are nested: {key!r} holds a dict ({len(value)} entries), not a tensor "
                f"(a training checkpoint?). minisbert reads a flat state dict: save checkpoint[{key!r}] "
                f"itself with torch.save or safetensors")
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: a tensor is named {key!r} ({type(key).__name__}); names must be strings")
        if not isinstance(value, (_Tensor, torch.Tensor)):
            raise CheckpointError(f"{path}: entry {key!r} holds a {type(value).__name__}, expected a tensor")


def _check_view(tensor: _Tensor, key: str, path: Path) -> None:
    storage = tensor.storage
    if not isinstance(storage, _Storage) or not isinstance(tensor.dtype, torch.dtype):
        raise CheckpointError(f"{path}: tensor {key!r} is malformed (no storage or dtype)")
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= 64
            and all(map(_is_count, size + stride)) and _is_count(offset)):
        raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape {size!r:.100}, stride "
                              f"{stride!r:.100} or offset {offset!r:.30}")
    available = storage.nbytes // _element_size(tensor.dtype) - offset  # elements from the offset on
    numel, last = 1, 0  # element count, and the index of the last element from the offset
    for n, s in zip(size, stride):
        numel *= n
        last += (n - 1) * s
    # A view may repeat elements (stride 0) or skip some, but never needs more elements than its
    # storage has: such a shape is a small storage posing as a large tensor, which costs its full
    # size once copied or cast.
    if numel and (numel > available or last >= available):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {list(size)} (stride {list(stride)}, offset "
                              f"{offset}) but its storage holds {storage.nbytes} bytes: a shape larger than "
                              f"its data; refused")


def _scan_zip(path: Path, size: int):
    try:
        with zipfile.ZipFile(path) as archive:  # reads the central directory only
            infos = archive.infolist()
            if not infos:
                raise CheckpointError(f"{path}: empty zip archive")
            prefix = infos[0].filename.split("/", 1)[0]  # torch reads records under the first entry's folder
            records = {}
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{path}: record {info.filename!r} is compressed (zip method {info.compress_type}); "
                        f"torch.save never compresses, and inflating it could take any amount of memory; refused")
                if info.file_size > size or info.compress_size != info.file_size:
                    raise CheckpointError(f"{path}: record {info.filename!r} claims {info.file_size} bytes, the "
                                          f"file has {size}")
                if info.filename.startswith(f"{prefix}/data/"):
                    records[info.filename[len(prefix) + 6:]] = info.file_size
            names = {info.filename: info for info in infos}
            if f"{prefix}/constants.pkl" in names:
                raise CheckpointError(f"{path}: a TorchScript archive, not a state dict")
            pkl = names.get(f"{prefix}/data.pkl")
            if pkl is None:
                raise CheckpointError(f"{path}: a zip archive without {prefix}/data.pkl: not a torch.save file")
            if pkl.file_size > PICKLE_LIMIT:
                raise CheckpointError(f"{path}: its pickle has {pkl.file_size} bytes, more than the "
                                      f"{PICKLE_LIMIT} minisbert reads for it; refused")
            data = archive.read(pkl)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint (damaged zip archive: {e})") from None
    state, scanner = _scan(io.BytesIO(data), path)
    return state, scanner, records


def _scan_legacy(path: Path, size: int):
    """The pre-1.6 format: magic number, protocol, system info, the state dict's pickle, the storage
    keys, then each storage as an 8-byte element count followed by its bytes."""
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(PICKLE_LIMIT))  # every pickle must fit here; the storages follow
        header = []
        for _ in range(3):
            header.append(_scan(head, path)[0])
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy "
                                  f"format's magic number)")
        state, scanner = _scan(head, path)
        keys = _scan(head, path)[0]
        if not (isinstance(keys, list) and all(k in scanner.storages for k in keys)
                and len(set(keys)) == len(keys) == len(scanner.storages)):
            raise CheckpointError(f"{path}: the storage list does not match the storages the pickle declares")
        position, records = head.tell(), {}
        for key in keys:  # walk the storages without reading them
            f.seek(position)
            count = f.read(8)
            if len(count) < 8:
                raise CheckpointError(f"{path}: truncated: storage {key!r} starts past the end of the file")
            (numel,) = struct.unpack("<q", count)
            declared = scanner.storages[key]
            nbytes = numel * _element_size(declared.dtype)
            if numel != declared.numel or position + 8 + nbytes > size:
                raise CheckpointError(f"{path}: storage {key!r} holds {numel} elements at byte {position}, "
                                      f"the pickle declares {declared.numel} and the file has {size} bytes")
            records[key] = nbytes
            position += 8 + nbytes
    return state, scanner, records


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """Legacy PyTorch checkpoint: checked (``check_torch_bin``), then read through the restricted
    unpickler only (``weights_only=True``)."""
    path = Path(path)
    check_torch_bin(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the pickle holds objects beyond plain tensors "
                              f"(it could run code), and only weights_only loading is allowed. "
                              f"Detail: {str(e).splitlines()[0]}") from None
    except Exception as e:  # torch raises many types for damaged zip archives
        raise CheckpointError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    check_flat_state(state, path)
    return dict(state)


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
    save_file(state, str(target), metadata={"format": "pt", "converted_from": Path(source).name})
    return Path(target)
