"""Hostile folders, files and inputs, built the way an attacker would build them (each test writes its
own hostile files): no hang, no huge allocation, no silent NaN, no lost output, and
sentence-transformers' semantics where it defines them.

Where a regression could hang or take the machine down (FIFOs, device files, sparse files, decompression
and allocation bombs, a fork deadlock, multi-MB texts), the work runs in a child process whose address
space is limited (RLIMIT_AS) and which is killed after a timeout; it reports what it saw as JSON."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_checkpoint, single_thread, st_model
from safetensors.torch import load_file, save_file

from minisbert import CheckpointError, ConfigError, ModelNotFoundError, SentenceEncoder, UnsupportedModuleError
from minisbert.io import weights as checkpoint_module
from minisbert.io.folder import MODULE_TYPES
from minisbert.text.long_texts import REORDERABLE, WORD_CHARS, expand
from minisbert.text.tokenizer import TextTokenizer


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny BERT in sentence-transformers layout, with Normalize (so that dropping it shows)."""
    return make_checkpoint(tmp_path_factory.mktemp("hostile"), "bert", max_seq_length=128, normalize=True)


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


# -- a child process with bounded memory and time ----------------------------------------------------

CHILD = """
import json, os, resource, sys, time
limit = int(os.environ["HOSTILE_ADDRESS_SPACE"])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
torch.set_num_threads(1)
from minisbert import SentenceEncoder
from minisbert.errors import MinisbertError

def peak_mib():
    # VmHWM is this process's own peak: ru_maxrss starts from the parent's RSS at fork and survives exec,
    # so under a large pytest process it would report the parent.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

def attempt(load):
    try:
        load()
        return {"loaded": True}
    except MinisbertError as e:
        return {"error": type(e).__name__, "message": str(e)}
"""

# What a child may use: torch alone reserves ~0.8 GiB of address space; each hostile case below would
# need more than the rest if it were read, inflated or allocated.
ADDRESS_SPACE = 2 << 30


def in_child(body: str, *args, timeout: float = 180) -> dict:
    env = dict(os.environ, HOSTILE_ADDRESS_SPACE=str(ADDRESS_SPACE), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               MALLOC_ARENA_MAX="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    try:
        run = subprocess.run([sys.executable, "-c", CHILD + body, *map(str, args)], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s (a hang?)")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


LOAD_EACH = """
results = [attempt(lambda: SentenceEncoder.from_pretrained(path).encode(["x"])) for path in sys.argv[1:]]
print(json.dumps({"results": results, "peak_mib": peak_mib()}))
"""


def load_each_in_child(folders: list[Path], timeout: float = 180) -> tuple[list[dict], float]:
    out = in_child(LOAD_EACH, *folders, timeout=timeout)
    return out["results"], out["peak_mib"]


# -- files that block, never end, or are huge ---------------------------------------------------------

SMALL_FILES = ["config.json", "modules.json", "tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json",
               "special_tokens_map.json", "1_Pooling/config.json", "model.safetensors"]


def test_fifos_and_devices_are_refused_without_blocking(tiny, tmp_path):
    """A FIFO blocks open() until a writer appears (forever); /dev/zero never ends. Each in place of
    every file minisbert reads: refused by type before anything opens it."""
    cases = []
    for i, name in enumerate(SMALL_FILES + ["vocab.txt", "model.safetensors.index.json"]):
        for kind in ("fifo", "/dev/zero"):
            folder = copy_of(tiny, tmp_path, f"{kind.strip('/').replace('/', '_')}{i}")
            if name == "vocab.txt":
                (folder / "tokenizer.json").unlink()  # so that vocab.txt is what builds the tokenizer
            if name == "model.safetensors.index.json":
                (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
            target = folder / name
            target.unlink(missing_ok=True)
            if kind == "fifo":
                os.mkfifo(target)
            else:
                target.symlink_to(kind)
            cases.append((name, kind, folder))
    results, _ = load_each_in_child([folder for _, _, folder in cases], timeout=300)
    for (name, kind, _), result in zip(cases, results):
        assert result.get("error") in ("ConfigError", "CheckpointError"), (name, kind, result)
        assert name in result["message"] and "not a regular file" in result["message"], (name, kind, result)


def test_huge_sparse_files_are_refused_by_size(tiny, tmp_path):
    """8 GiB config and tokenizer files and an 80 GiB weights file, sparse (they cost no disk): refused by
    their size, the limit named in the message, with no read of their content."""
    cases = []
    for name, size, limit in [("config.json", 8 << 30, "16777216"), ("modules.json", 8 << 30, "16777216"),
                              ("tokenizer.json", 8 << 30, "268435456"), ("vocab.txt", 8 << 30, "268435456"),
                              ("model.safetensors", 80 << 30, "68719476736")]:
        folder = copy_of(tiny, tmp_path, name.replace(".", "_"))
        if name == "vocab.txt":
            (folder / "tokenizer.json").unlink()
        with open(folder / name, "r+b") as f:
            f.truncate(size)  # the valid start stays; the rest reads as zeros
        cases.append((name, size, limit, folder))
    results, peak = load_each_in_child([c[-1] for c in cases])
    for (name, size, limit, _), result in zip(cases, results):
        assert result.get("error") in ("ConfigError", "CheckpointError"), (name, result)
        assert f"{name}: the" in result["message"] and f"has {size} bytes, more than the {limit}" in result["message"]
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"


NESTED = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["config.json", "modules.json", "tokenizer_config.json", "sentence_bert_config.json",
                                  "config_sentence_transformers.json", "1_Pooling/config.json",
                                  "special_tokens_map.json", "tokenizer.json", "model.safetensors.index.json",
                                  "model.safetensors"])
def test_deeply_nested_json_is_refused(tiny, tmp_path, name):
    """JSON nested 100k deep exhausts a recursive parser (a bare RecursionError, or a stack overflow)."""
    folder = copy_of(tiny, tmp_path)
    if name == "model.safetensors":  # inside the safetensors header
        raw = json.dumps({"__metadata__": {"x": "y"}}).replace('{"x": "y"}', NESTED).encode()
        (folder / name).write_bytes(struct.pack("<Q", len(raw)) + raw)
    else:
        if name.endswith(".index.json"):
            (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / name).write_text('{"weight_map": ' + NESTED + "}" if "index" in name else NESTED)
    with pytest.raises((ConfigError, CheckpointError)) as caught:
        SentenceEncoder.from_pretrained(folder)
    message = str(caught.value)
    assert name in message and ("nests too deeply" in message or "RecursionError" in message
                                or "unreadable tokenizer" in message), message


# -- shard indexes ------------------------------------------------------------------------------------


def shard(folder: Path, split: int = 2) -> dict[str, str]:
    """Split model.safetensors into ``split`` shards with an index, as transformers writes them."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    weight_map = {}
    for i in range(split):
        name = f"model-{i + 1:05d}-of-{split:05d}.safetensors"
        part = {k: state[k] for k in keys[i::split]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    write_index(folder, weight_map)
    return weight_map


def write_index(folder: Path, weight_map, name: str = "model.safetensors.index.json") -> None:
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_loads(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    expected = SentenceEncoder.from_pretrained(folder).encode(["샤드 두 개"])
    shard(folder)
    np.testing.assert_array_equal(SentenceEncoder.from_pretrained(folder).encode(["샤드 두 개"]), expected)


@pytest.mark.parametrize("case, pattern", [
    ("names itself", r"shard 'model\.safetensors\.index\.json' \(of tensor .*\) is not a \.safetensors or \.bin file"),
    ("names another index", r"shard 'other\.index\.json' \(of tensor .*\) is not a \.safetensors or \.bin file"),
    ("shard name an int", r"weight_map\['[^']+'\] is 3, expected a shard file name"),
    ("shard name null", r"weight_map\['[^']+'\] is None, expected a shard file name"),
    ("shard in a subfolder", r"shard 'sub/x\.safetensors' .* is not a \.safetensors or \.bin file beside the index"),
    ("weight_map a list", r"the shard index's weight_map is list"),
    ("index a list", r"the shard index is not a JSON object"),
    ("shard missing", r"shard 'model-00003-of-00003\.safetensors' is missing"),
    ("tensor not in its shard", r"1 tensors are not in the shard the index names for them, e\.g\. 'ghost\.weight'"),
    ("tensor in two shards, in neither by the index",
     r"tensor 'orphan\.weight' is in shards 'model-00001-of-00002\.safetensors' and "
     r"'model-00002-of-00002\.safetensors', and the index names neither"),
])
def test_hostile_shard_index_is_refused(tiny, tmp_path, case, pattern):
    folder = copy_of(tiny, tmp_path)
    weight_map = shard(folder)
    first = next(iter(weight_map))
    index = folder / "model.safetensors.index.json"
    if case == "names itself":
        weight_map[first] = "model.safetensors.index.json"
    elif case == "names another index":
        write_index(folder, {first: "model.safetensors.index.json"}, "other.index.json")
        weight_map[first] = "other.index.json"
    elif case == "shard name an int":
        weight_map[first] = 3
    elif case == "shard name null":
        weight_map[first] = None
    elif case == "shard in a subfolder":
        weight_map[first] = "sub/x.safetensors"
    elif case == "weight_map a list":
        weight_map = list(weight_map)
    elif case == "shard missing":
        weight_map[first] = "model-00003-of-00003.safetensors"
    elif case == "tensor not in its shard":
        weight_map["ghost.weight"] = weight_map[first]
    elif case == "tensor in two shards, in neither by the index":
        for name in sorted(set(weight_map.values())):
            save_file(dict(load_file(folder / name), **{"orphan.weight": torch.zeros(2)}), folder / name)
    write_index(folder, weight_map)
    if case == "index a list":
        index.write_text("[]")
    with pytest.raises(CheckpointError, match=pattern) as caught:
        SentenceEncoder.from_pretrained(folder)
    assert "model.safetensors.index.json" in str(caught.value)


@pytest.mark.parametrize("stray_in", ["an earlier shard", "a later shard"])
def test_tensor_in_two_shards_loads_the_copy_the_index_names(tiny, tmp_path, stray_in):
    """A stray copy of a tensor in another shard (different values) is ignored: the index names where each
    tensor is. transformers (5.24) reads every shard in turn, so the later copy wins there: it agrees
    when the stray copy sits in an earlier shard, and loads the copy the index does not name otherwise."""
    folder = copy_of(tiny, tmp_path)
    text = ["오늘 서울의 날씨는 맑다."]
    intact = SentenceEncoder.from_pretrained(folder).encode(text)
    weight_map = shard(folder, split=3)
    shards = sorted(set(weight_map.values()))
    key = next(k for k, s in sorted(weight_map.items()) if s == shards[1])
    other = shards[0] if stray_in == "an earlier shard" else shards[2]
    stray = load_file(folder / other)
    stray[key] = torch.randn_like(load_file(folder / shards[1])[key]) * 3  # a different copy, elsewhere
    save_file(stray, folder / other, metadata={"format": "pt"})
    ours = SentenceEncoder.from_pretrained(folder).encode(text)
    np.testing.assert_array_equal(ours, intact)
    reference = st_model(folder).encode(text)
    if stray_in == "an earlier shard":
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    else:
        assert np.abs(reference - intact).max() > 1e-3, "transformers now reads the copy the index names"
    # The index decides: pointing it at the stray copy changes the result (so the test can fail).
    weight_map[key] = other
    write_index(folder, weight_map)
    assert np.abs(SentenceEncoder.from_pretrained(folder).encode(text) - intact).max() > 1e-3


def test_tensor_in_a_shard_but_not_in_the_index_is_unexpected(tiny, tmp_path):
    """transformers reports such a tensor as UNEXPECTED; minisbert's strict loading refuses it."""
    folder = copy_of(tiny, tmp_path)
    weight_map = shard(folder)
    name = sorted(set(weight_map.values()))[0]
    extra = load_file(folder / name)
    extra["smuggled.weight"] = torch.zeros(3)
    save_file(extra, folder / name, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors .*: smuggled\.weight"):
        SentenceEncoder.from_pretrained(folder)


# -- hostile pytorch_model.bin -------------------------------------------------------------------------
# Written by hand: a pickle naming storages and tensors by their numbers, and the records.


class StorageRef:
    """Pickled as torch.save pickles a storage: ("storage", <class>, key, location, element count)."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage, view=False):
        self.key, self.numel, self.storage_type, self.view = key, numel, storage_type, view


class TensorRef:
    """Pickled as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: StorageRef, size, stride, offset: int = 0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 collections.OrderedDict())


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            pid = ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
            return pid + (None,) if obj.view else pid
        return None


def pickled(obj) -> bytes:
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def zip_archive(entries, aliases: int = 0) -> bytes:
    """A zip archive from (name, payload as stored, method, uncompressed size, crc32) entries; ``aliases``
    more directory entries all pointing at the last entry's data (overlapping records)."""
    out, central = bytearray(), bytearray()
    last = None
    for name, payload, method, size, crc in entries:
        n = name.encode()
        last = (len(out), payload, method, size, crc)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload), size, len(n), 0) + n
        out += payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(payload), size,
                               len(n), 0, 0, 0, 0, 0, last[0]) + n
    for i in range(aliases):
        offset, payload, method, size, crc = last
        n = f"archive/data/{i + 1}".encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(payload), size,
                               len(n), 0, 0, 0, 0, 0, offset) + n
    count = len(entries) + aliases
    return bytes(out + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(out), 0))


def torch_zip(state, records: dict[str, bytes], compressed: dict[str, tuple[bytes, int, int]] | None = None,
              aliases: int = 0) -> bytes:
    """torch.save's zip layout; ``compressed`` gives deflated records as (stream, size, crc)."""
    stored = {"archive/data.pkl": pickled(state), "archive/version": b"3\n",
              **{f"archive/data/{k}": v for k, v in records.items()}}
    entries = [(name, data, 0, len(data), zlib.crc32(data)) for name, data in stored.items()]
    entries += [(f"archive/data/{k}", stream, 8, size, crc) for k, (stream, size, crc) in (compressed or {}).items()]
    return zip_archive(entries, aliases)  # aliases point at the last record


def torch_legacy(state, records: dict[str, tuple[int, bytes]]) -> bytes:
    """The pre-1.6 layout: magic, protocol, system info, the pickle, the storage keys, then each storage
    as its element count (as written in the file) and its bytes."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {
        "protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    body = pickled(state) + pickle.dumps(list(records), protocol=2)
    return head + body + b"".join(struct.pack("<q", n) + data for n, data in records.values())


def deflated_zeros(size: int) -> tuple[bytes, int, int]:
    """A deflate stream of ``size`` zero bytes (a few MB for GBs), built without ever holding them."""
    chunk = bytes(16 << 20)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = block.compress(chunk) + block.flush(zlib.Z_FULL_FLUSH)  # byte-aligned: can be repeated
    crc = 0
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return piece * (size // len(chunk)) + block.flush(zlib.Z_FINISH), size, crc


FOUR_BYTES = StorageRef("0", 1)
# name -> (a builder of the .bin's bytes, what the error must say)
HOSTILE_BINS = {
    "compressed record (2 GiB inflated)": (
        lambda: torch_zip({"w": TensorRef(StorageRef("0", 1 << 29), [1 << 29], [1])}, {},
                          compressed={"0": deflated_zeros(2 << 30)}),
        r"record 'archive/data/0' is compressed \(zip method 8\)"),
    "storage claiming 4 TiB": (
        lambda: torch_zip({"w": TensorRef(StorageRef("0", 1 << 40), [1], [1])}, {"0": bytes(4)}),
        r"storage '0' claims 1099511627776 elements of float32 \(4398046511104 bytes\), its record holds 4"),
    "4-byte storage as a 4 GiB tensor": (
        lambda: torch_zip({"w": TensorRef(FOUR_BYTES, [32768, 32768], [0, 0])}, {"0": bytes(4)}),
        r"tensor 'w' has shape \[32768, 32768\] \(stride \[0, 0\], offset 0\) but its storage holds 4 bytes"),
    "view past its storage": (
        lambda: torch_zip({"w": TensorRef(StorageRef("0", 16), [4, 4], [4, 1], offset=8)}, {"0": bytes(64)}),
        r"tensor 'w' has shape \[4, 4\] \(stride \[4, 1\], offset 8\) but its storage holds 64 bytes"),
    "1001 records sharing 1 MiB": (
        lambda: torch_zip({f"w{i}": TensorRef(StorageRef(str(i), 1 << 18), [1 << 18], [1]) for i in range(1001)},
                          {"0": bytes(1 << 20)}, aliases=1000),
        r"the storages claim 1049624576 bytes, more than the file's"),
    "legacy storage claiming 4 TiB": (
        lambda: torch_legacy({"w": TensorRef(StorageRef("1", 1 << 40, view=True), [1], [1])}, {"1": (1, bytes(4))}),
        r"storage '1' holds 1 elements at byte \d+, the pickle declares 1099511627776"),
    "pickle of 5 MiB": (
        lambda: torch_zip({"w": TensorRef(FOUR_BYTES, [1], [1]), "pad": "x" * (5 << 20)}, {"0": bytes(4)}),
        r"its pickle has \d+ bytes, more than the 4194304 minisbert reads for it"),
}


def test_hostile_bin_files_are_refused_before_anything_is_allocated(tmp_path):
    """Each would make torch.load inflate, allocate or (once copied) materialise gigabytes; each is refused
    from its own numbers first, in a child that could not hold those gigabytes."""
    paths = []
    for i, (build, _) in enumerate(HOSTILE_BINS.values()):
        (tmp_path / f"{i}.bin").write_bytes(build())
        paths.append(tmp_path / f"{i}.bin")
    body = """
from minisbert.io.weights import convert_to_safetensors, read_state_dict
results = [attempt(lambda: convert_to_safetensors(path, path + ".safetensors")) for path in sys.argv[1:]]
print(json.dumps({"results": results, "peak_mib": peak_mib()}))
"""
    out = in_child(body, *paths)
    for (name, (_, pattern)), result in zip(HOSTILE_BINS.items(), out["results"]):
        assert result.get("error") == "CheckpointError", (name, result)
        assert re.search(pattern, result["message"]), (name, result["message"])
    assert out["peak_mib"] < 1024, f"peak RSS {out['peak_mib']:.0f} MiB"


def test_hostile_bin_in_a_model_folder_names_the_file(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    build, pattern = HOSTILE_BINS["4-byte storage as a 4 GiB tensor"]
    (folder / "pytorch_model.bin").write_bytes(build())
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: " + pattern):
        SentenceEncoder.from_pretrained(folder)


def test_the_hand_written_formats_are_what_torch_reads(tmp_path):
    """Controls for the builders above: well-formed files written the same way load, in torch and here."""
    values = torch.arange(6, dtype=torch.float32)
    state = {"w": TensorRef(StorageRef("0", 6), [2, 3], [3, 1]), "t": TensorRef(StorageRef("0", 6), [3, 2], [1, 3])}
    for name, data in [("zip.bin", torch_zip(state, {"0": values.numpy().tobytes()})),
                       ("legacy.bin", torch_legacy({"w": TensorRef(StorageRef("0", 6, view=True), [2, 3], [3, 1])},
                                                   {"0": (6, values.numpy().tobytes())}))]:
        (tmp_path / name).write_bytes(data)
        expected = torch.load(tmp_path / name, weights_only=True)
        ours = checkpoint_module.read_state_dict(tmp_path / name)
        assert ours.keys() == expected.keys() and torch.equal(ours["w"], values.view(2, 3))
        assert all(torch.equal(ours[key], expected[key]) for key in ours)


def test_legacy_and_tied_bin_checkpoints_load(tiny, tmp_path):
    """What must still load: torch.save's pre-1.6 format, tied weights (one storage, two keys), views at
    an offset, nn.Parameters and transformers' _metadata."""
    folder = copy_of(tiny, tmp_path)
    text = ["레거시 형식"]
    expected = SentenceEncoder.from_pretrained(folder).encode(text)
    state = collections.OrderedDict(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    big = torch.cat([state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"]])
    state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"] = big[:64], big[64:]  # views
    state["embeddings.word_embeddings.weight"] = torch.nn.Parameter(state["embeddings.word_embeddings.weight"])
    state["cls.predictions.decoder.weight"] = state["embeddings.word_embeddings.weight"]  # tied, ignored key
    state._metadata = {"": {"version": 1}}
    for legacy in (False, True):
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        np.testing.assert_array_equal(SentenceEncoder.from_pretrained(folder).encode(text), expected)


@pytest.mark.parametrize("content, pattern", [
    (lambda s: {"state_dict": s, "epoch": 3},
     r"the weights are nested: 'state_dict' holds a dict \(\d+ entries\), not a tensor \(a training checkpoint\?\)"),
    (lambda s: list(s.values()), r"expected a dict of tensor name -> tensor, the file holds a list"),
    (lambda s: {**s, "step": 7}, r"entry 'step' holds a int, expected a tensor"),
    (lambda s: {**s, 3: torch.zeros(1)}, r"a tensor is named 3 \(int\); names must be strings"),
])
def test_bin_that_is_not_a_flat_state_dict_says_what_it_holds(tiny, tmp_path, content, pattern):
    folder = copy_of(tiny, tmp_path)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(content(state), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: " + pattern):
        SentenceEncoder.from_pretrained(folder)


# -- values that only overflow once cast ------------------------------------------------------------


@pytest.mark.parametrize("value, stored, dtype", [(1e39, torch.float64, torch.float32),
                                                  (7e4, torch.float32, torch.float16),
                                                  (1e39, torch.float64, torch.bfloat16)])
def test_weights_that_overflow_in_the_requested_dtype_are_refused(tiny, tmp_path, value, stored, dtype):
    """Finite in the file, infinite in the dtype the model runs in: every embedding would be NaN."""
    folder = copy_of(tiny, tmp_path)
    state = load_file(folder / "model.safetensors")
    key = "encoder.layer.1.output.dense.weight"
    state = {k: v.to(stored) for k, v in state.items()}
    state[key].view(-1)[5] = value
    save_file(state, folder / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    largest = re.escape(f"{value:.3g}")
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' overflows to infinity in {name} \(largest \|value\| "
                                              rf"{largest}\).*minisbert's blocks\.1\.ffn\.down\.weight"):
        SentenceEncoder.from_pretrained(folder, dtype=dtype)
    if dtype == torch.float16:  # the same file in float32 is fine
        assert np.isfinite(SentenceEncoder.from_pretrained(folder).encode(["괜찮다"])).all()


# -- fork ------------------------------------------------------------------------------------------


def test_fork_after_loading_before_any_encode_does_not_deadlock(tiny):
    """Loading runs parallel regions in torch's OpenMP pool; a child forked before the first encode that
    then encodes waited forever for threads it does not have, unless the guard (registered by
    from_pretrained) makes it single-threaded."""
    body = """
torch.set_num_threads(2)
encoder = SentenceEncoder.from_pretrained(sys.argv[1])
pid = os.fork()
if pid == 0:
    encoder.encode(["포크 뒤에 인코딩"] * 8)
    os._exit(0)
for _ in range(600):  # 60 s
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    status = None
print(json.dumps({"status": status}))
"""
    assert in_child(body, tiny)["status"] == 0, "the forked child did not finish encoding within 60 s"


# -- modules.json as sentence-transformers reads it --------------------------------------------------


def test_modules_run_in_list_order_whatever_their_idx(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    for module, idx in zip(modules, (2, 0, 1)):
        module["idx"] = idx  # sorted by idx this would be Pooling, Normalize, Transformer
    (folder / "modules.json").write_text(json.dumps(modules))
    text = ["목록 순서대로"]
    np.testing.assert_allclose(SentenceEncoder.from_pretrained(folder).encode(text), st_model(folder).encode(text),
                               atol=1e-5)


def test_broken_modules_json_symlink_is_an_error_not_a_bare_model(tiny, tmp_path):
    """sentence-transformers checks modules.json with Path.exists(), false for a broken link, and loads the
    folder as a bare transformer: no Normalize, different embeddings. minisbert refuses."""
    folder = copy_of(tiny, tmp_path)
    text = ["깨진 링크"]
    intact = st_model(folder).encode(text)
    (folder / "modules.json").unlink()
    (folder / "modules.json").symlink_to(tmp_path / "gone.json")
    bare = st_model(folder).encode(text)
    assert abs(np.linalg.norm(intact) - 1) < 1e-5 and abs(np.linalg.norm(bare) - 1) > 1e-3  # Normalize dropped
    with pytest.raises(ModelNotFoundError, match=r"modules\.json: the module list is a broken symbolic link \(to "):
        SentenceEncoder.from_pretrained(folder)


def _st_class(path: str):
    """The class sentence-transformers 6.2 loads for a modules.json type, or the error it raises."""
    import warnings

    from sentence_transformers.util.misc import import_module_class

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return import_module_class(path, "/nonexistent")
        except (ImportError, ValueError) as e:
            return e


def test_every_accepted_module_path_is_that_module_in_sentence_transformers():
    from sentence_transformers import models

    classes = {"Transformer": models.Transformer, "Pooling": models.Pooling, "Dense": models.Dense,
               "Normalize": models.Normalize, "LayerNorm": models.LayerNorm,
               "WeightedLayerPooling": models.WeightedLayerPooling}
    for path, kind in MODULE_TYPES.items():
        if kind == "KoBertTransformer":
            continue  # ko-sentence-transformers' own class (tests/test_kobert.py loads it)
        assert _st_class(path) is classes[kind], path
    # What sentence-transformers 6.2 writes when it saves a model is among them.
    for kind, cls in classes.items():
        assert MODULE_TYPES[f"{cls.__module__}.{cls.__name__}"] == kind


@pytest.mark.parametrize("path", [
    "some_pkg.custom.Pooling", "Pooling", "sentence_transformers.Pooling", "sentence_transformers.models.pooling",
    "sentence_transformers.cross_encoder.modules.Pooling", "sentence_transformers.models.pooling.Pooling",
    "sentence_transformers.models.Pooling ", "sentence_transformers.models.Normalize.Pooling",
    "sentence_transformers.sparse_encoder.modules.SpladePooling", "my_package.sentence_transformers.models.Pooling"])
def test_module_paths_sentence_transformers_does_not_load_as_pooling_are_refused(tiny, tmp_path, path):
    """Matched exactly: sentence-transformers refuses each of these, or imports another class (a second
    copy of its pooling module, SPLADE pooling); minisbert refuses them all."""
    from sentence_transformers import models

    assert _st_class(path) is not models.Pooling
    folder = copy_of(tiny, tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = path
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedModuleError, match=r"modules\.json: module .* is not implemented by minisbert"):
        SentenceEncoder.from_pretrained(folder)


@pytest.mark.parametrize("index, key, value", [(1, "type", "sentence_transformers.models.Pooling\0"),
                                               (1, "path", "1_Pooling\0"), (0, "path", "\0"),
                                               (0, "type", "\0sentence_transformers.models.Transformer")])
def test_nul_byte_in_a_module_entry_names_the_file_and_key(tiny, tmp_path, index, key, value):
    """A NUL byte in a module's type or path is a ConfigError naming modules.json and the key, not the
    bare ValueError ("embedded null byte") that opening such a path raises."""
    folder = copy_of(tiny, tmp_path)
    modules = json.loads((folder / "modules.json").read_text())
    modules[index][key] = value
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=rf"modules\.json: module {key} .* contains a NUL byte"):
        SentenceEncoder.from_pretrained(folder)


def test_current_module_paths_load(tiny, tmp_path):
    """A folder saved by sentence-transformers 6.2 (its own module paths) loads and equals it."""
    folder = tmp_path / "saved"
    st_model(tiny).save(str(folder))
    types = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert types[0] == "sentence_transformers.base.modules.transformer.Transformer", types
    text = ["새 경로"]
    np.testing.assert_allclose(SentenceEncoder.from_pretrained(folder).encode(text), st_model(folder).encode(text),
                               atol=1e-5)


# -- tokenizer files ------------------------------------------------------------------------------------


def test_repeated_vocab_token_keeps_its_last_line_like_transformers(tiny, tmp_path):
    from transformers import BertTokenizer

    folder = copy_of(tiny, tmp_path)
    (folder / "tokenizer.json").unlink()  # build from vocab.txt
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    token = next(t for t in lines[100:] if len(t) > 1 and t.isalpha())  # a whole word of the vocabulary
    first, last = lines.index(token), len(lines) - 1
    lines[last] = token  # the same token again, on the last line (within the embedding table)
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = f"{token} 한국어"
    enc = SentenceEncoder.from_pretrained(folder)
    ids = enc.tokenizer.encode_ids([text])[0]
    reference = BertTokenizer.from_pretrained(str(folder))(text)["input_ids"]
    assert ids == reference and last in ids and first not in ids, (ids, reference)


@pytest.mark.parametrize("key, value", [("do_lower_case", "yes"), ("strip_accents", "no"),
                                        ("tokenize_chinese_chars", 1), ("unk_token", 5), ("pad_token", ["[PAD]"]),
                                        ("cls_token", {"content": 3})])
def test_tokenizer_config_values_of_the_wrong_type_name_the_file(tiny, tmp_path, key, value):
    folder = copy_of(tiny, tmp_path)
    (folder / "tokenizer.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config[key] = value
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json: " + re.escape(f"{key}={value!r}")):
        SentenceEncoder.from_pretrained(folder)


@pytest.mark.parametrize("source", ["vocab.txt", "tokenizer.json"])
def test_token_ids_beyond_the_embedding_table_are_refused_at_load(tiny, tmp_path, source):
    """Loaded, such a tokenizer fails with an IndexError at the first text holding the token."""
    folder = copy_of(tiny, tmp_path)
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    if source == "vocab.txt":
        (folder / "tokenizer.json").unlink()
        with open(folder / "vocab.txt", "a", encoding="utf-8") as f:
            f.write("초과토큰\n")
    else:
        tok = json.loads((folder / "tokenizer.json").read_text())
        tok["added_tokens"].append({"id": vocab_size + 5, "content": "<extra>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=rf"{source}: token '.*' has id \d+, but the model has "
                                          rf"vocab_size={vocab_size} \(.*config\.json\): no embedding for it"):
        SentenceEncoder.from_pretrained(folder)


# -- checkpoint keys in errors ------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_missing_tensor_is_named_as_the_checkpoint_names_it(tiny, tmp_path, prefix):
    folder = copy_of(tiny, tmp_path)
    state = {prefix + k: v for k, v in load_file(folder / "model.safetensors").items()}
    del state[prefix + "encoder.layer.1.attention.self.query.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"1 tensors missing from the checkpoint .*: "
                                              rf"{prefix}encoder\.layer\.1\.attention\.self\.query\.weight "
                                              rf"\(minisbert's blocks\.1\.attn\.query\.weight\)"):
        SentenceEncoder.from_pretrained(folder)


# -- long texts ------------------------------------------------------------------------------------------

FIVE_MB = 5_000_000
SHAPES = {
    "prose": "한국어 문장 임베딩 ",
    "no spaces": "한국어문장임베딩",
    "one long word": "a",
    "only newlines": "\n",
    "words on lines": "word\n",
    "punctuation, no spaces": "hello,world.",
    "CJK": "中文",
    "emoji": "🙂",
    "control characters": "\x01",
    "combining marks": "\u0301",
    "decomposed accents": "e\u0301",
    "ideographic spaces": "\u3000",
}

LONG_TEXTS = """
import re

def status(key):  # kB
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

encoder = SentenceEncoder.from_pretrained(sys.argv[1])
encoder.encode(["warm up"])
shapes, out = json.loads(sys.argv[2]), {}
for name, shape in shapes.items():
    text = (shape * (5_000_000 // len(shape) + 1))[:5_000_000]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before, cpu = status("VmRSS"), time.process_time()
    vector = encoder.encode([text])
    out[name] = {"cpu_s": time.process_time() - cpu, "extra_mib": (status("VmHWM") - before) / 1024,
                 "nonzero": bool(abs(vector).sum() > 0)}
    del text, vector
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def five_mb_texts(minilm_path) -> dict:
    """Encoding one 5 MB text of each shape in a child: CPU time (not wall time, which other processes on
    a shared machine inflate) and peak RSS growth."""
    return in_child(LONG_TEXTS, minilm_path, json.dumps(SHAPES), timeout=600)


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_a_5mb_text_of_any_shape_costs_under_a_second_and_100mb(five_mb_texts, shape):
    """Before: 65 s and +1.7 GB (Korean without spaces), 16 s and +718 MB (newlines), 92 s and +3.2 GB (CJK)."""
    out = five_mb_texts[shape]
    assert out["nonzero"] and out["cpu_s"] < 1.0 and out["extra_mib"] < 100, out


def _reference(tok: TextTokenizer, texts: list[str]) -> list[list[int]]:
    tok.cut_is_safe = False
    try:
        return tok.encode_ids(texts)
    finally:
        tok.cut_is_safe = True


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_long_texts_of_every_shape_keep_their_tokens(minilm_path, tiny, shape):
    """Against whole-text tokenization, at sizes where that is still affordable."""
    for path in (minilm_path, tiny):
        tok = SentenceEncoder.from_pretrained(path).tokenizer
        for n in (3_000, 30_000):
            text = (SHAPES[shape] * (n // len(SHAPES[shape]) + 1))[:n]
            mixed = "시작 " + text + " 끝, end"
            assert tok.encode_ids([text, mixed]) == _reference(tok, [text, mixed]), (path, n)


# An attacker's alphabet for the cut and squeeze: whitespace of every kind, deleted characters, accents
# and characters reordered past them, punctuation old and new, CJK, emoji, special tokens, "_".
ALPHABET = ["a", "é", "e\u0301", "한국어", "中", "\U00020000", ",", ".", "_", "$", "[", "]", "[MASK]", "[UNK]", " ",
            "\n", "\t", "\u3000", "\u00a0", "\x0b", "\x85", "\x01", "\x00", "\ufffd", "\u200b", "\u200d", "\ufeff",
            "\u0301", "\u0316", "\u0345", "\U0001d165", "\u302e", "🙂", "👍🏽", "…", "。", "\u2e43", "≠", "\u1fef",
            "İ", "Σ", "ａ", "MASK"]


def test_cut_and_squeeze_never_change_tokens_fuzzed(minilm_path, tiny):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from tokenizers import normalizers

    tokenizers = [SentenceEncoder.from_pretrained(p).tokenizer for p in (minilm_path, tiny)]
    base = tokenizers[0].tokenizer
    for clean, chinese, accents, lower in [(False, False, False, False), (True, True, True, False)]:
        variant = type(base).from_str(base.to_str())
        variant.normalizer = normalizers.BertNormalizer(clean_text=clean, handle_chinese_chars=chinese,
                                                        strip_accents=accents, lowercase=lower)
        tokenizers.append(TextTokenizer(variant, 0, do_lower_case=not lower))
    repeats = st.sampled_from([1, 1, 2, 5, 120, 450, 900])
    piece = st.tuples(st.sampled_from(ALPHABET), repeats).map(lambda p: p[0] * p[1])

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(parts=st.lists(piece, min_size=1, max_size=12), which=st.integers(0, len(tokenizers) - 1),
           max_seq_length=st.sampled_from([4, 9, 40]), chars_per_token=st.sampled_from([1, 3]))
    def check(parts, which, max_seq_length, chars_per_token):
        tok, text = tokenizers[which], "".join(parts)
        tok.max_seq_length, tok.cut_chars_per_token = max_seq_length, chars_per_token
        assert tok.encode_ids([text]) == _reference(tok, [text])
        # The squeeze alone keeps every token, not only the first max_seq_length.
        tok.tokenizer.no_truncation()
        try:
            assert tok.tokenizer.encode(tok.long_texts.squeeze(text)).ids == tok.tokenizer.encode(text).ids
        finally:
            tok.max_seq_length = max_seq_length

    check()


@pytest.mark.parametrize("config", [
    dict(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True),
    dict(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False)])
def test_word_characters_never_end_a_word_in_the_tokenizers_library(config):
    """Every character of WORD_CHARS (Python's \\w, from Python's Unicode tables) stays inside a word for
    the installed tokenizers library, whose tables are its own: a run of them is one word."""
    from tokenizers import normalizers, pre_tokenizers

    word = re.compile(f"[{WORD_CHARS}]")
    chinese = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002ceaf\U0002f800-\U0002fa1f]")
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and word.match(chr(c))
             and not (config["handle_chinese_chars"] and chinese.match(chr(c))) and chr(c) != "_"]
    normalizer, pre = normalizers.BertNormalizer(**config), pre_tokenizers.BertPreTokenizer()
    for start in range(0, len(chars), 20_000):
        probe = "a" + "a".join(chars[start: start + 20_000]) + "a"
        words = pre.pre_tokenize_str(normalizer.normalize_str(probe))
        assert len(words) == 1, f"split at {words[0][0][-3:]!r} / {words[1][0][:3]!r}"


def test_reorderable_characters_are_all_listed():
    import unicodedata

    found = {chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and any(
        unicodedata.combining(d) and unicodedata.category(d) != "Mn" for d in unicodedata.normalize("NFD", chr(c)))}
    assert found == set(expand(REORDERABLE)), sorted(found ^ set(expand(REORDERABLE)))


# -- inputs as sentence-transformers takes them ----------------------------------------------------------


def test_dict_inputs_are_their_text_as_in_sentence_transformers(minilm_path):
    ours, ref = SentenceEncoder.from_pretrained(minilm_path), st_model(minilm_path)
    one = ours.encode({"text": "사전 입력"})
    assert one.shape == (384,)
    np.testing.assert_allclose(one, ref.encode({"text": "사전 입력"}), atol=1e-6)
    np.testing.assert_array_equal(one, ours.encode("사전 입력"))
    batch = [{"text": "첫째"}, "둘째", {"text": "셋째"}]
    np.testing.assert_allclose(ours.encode(batch), ref.encode(batch), atol=1e-6)


@pytest.mark.parametrize("item, error, pattern", [
    ({}, ValueError, r"sentences\[0\] is an empty dict"),
    ({"sentence": "x"}, ValueError, r"sentences\[0\] has keys \['sentence'\], not modalities"),
    ({"text": "x", "other": "y"}, ValueError, r"has keys \['other'\], not modalities"),
    ({"image": "x.png"}, ValueError, r"sentences\[0\] is a image input; minisbert embeds text only"),
    ({"text": 3}, TypeError, r"sentences\[0\]\['text'\] is int, expected str"),
    ({"text": ["a", "b"]}, TypeError, r"is list, expected str \(a sentence pair, which minisbert does not support\)"),
])
def test_dicts_sentence_transformers_refuses_or_reads_as_pairs_are_clear_errors(minilm_path, item, error, pattern):
    ours = SentenceEncoder.from_pretrained(minilm_path)
    with pytest.raises(error, match=pattern):
        ours.encode([item])
    if item.get("text") != ["a", "b"]:  # sentence-transformers embeds that one as a pair
        with pytest.raises(ValueError):
            st_model(minilm_path).encode([item])


def test_numpy_integers_are_accepted_like_sentence_transformers(minilm_path):
    texts = ["넘파이 정수", "numpy integers"]
    ours, ref = SentenceEncoder.from_pretrained(minilm_path), st_model(minilm_path)
    ours.max_seq_length, ref.max_seq_length = np.int64(16), np.int64(16)
    got = ours.encode(texts, batch_size=np.int32(1), truncate_dim=np.int64(32))
    assert got.shape == (2, 32)
    np.testing.assert_allclose(got, ref.encode(texts, batch_size=np.int32(1), truncate_dim=np.int64(32)), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int8, "int8", torch.complex64, "float"])
def test_dtype_that_is_not_a_float_the_models_run_in_is_a_value_error(tiny, dtype):
    with pytest.raises(ValueError, match=r"dtype=.* is not one of float32, float16, bfloat16"):
        SentenceEncoder.from_pretrained(tiny, dtype=dtype)


@pytest.mark.parametrize("value", [["query"], {"name": "query"}, 3])
def test_default_prompt_name_of_the_wrong_type_names_the_file(tiny, tmp_path, value):
    folder = copy_of(tiny, tmp_path)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": value}))
    with pytest.raises(ConfigError, match=r"config_sentence_transformers\.json: default_prompt_name="):
        SentenceEncoder.from_pretrained(folder)
