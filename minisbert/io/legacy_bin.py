"""The legacy PyTorch format (``pytorch_model.bin``), checked before ``torch.load`` allocates anything.

``torch.save`` writes a zip archive (uncompressed: ``<name>/data.pkl``, the pickled state dict, and one
record ``<name>/data/<key>`` per storage) or, before PyTorch 1.6, a stream of pickles followed by the
raw storages. The pickle names each storage by (dtype, key, element count) and each tensor by
(storage, offset, size, stride). torch.load trusts those numbers: it allocates a storage of the
claimed size, inflates a compressed record to whatever size it says, and a tensor of shape
(16384, 16384) and stride (0, 0) over a 4-byte storage loads fine and costs 1 GiB once copied. So
the pickle is first read by ``_Scanner``, which builds nothing but records of those numbers, and
every number is checked against the file; then ``torch.load(weights_only=True)`` reads it: a pickle
that would construct arbitrary objects (and so could run code) is refused before anything in it runs.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from minisbert.errors import CheckpointError

log = logging.getLogger("minisbert")


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
