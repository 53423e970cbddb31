"""Every small file minisbert reads (JSON configs, tokenizer files, vocabularies) goes through here;
weights files are checked here (``regular_file``) before ``io/weights.py`` opens them.

A model folder is untrusted input: a "config" may be a FIFO that blocks ``open`` forever, a symlink
to ``/dev/zero``, a sparse multi-GB file, or JSON nested deep enough to exhaust the parser's stack.
So a file is read only when it is a regular file (after resolving symlinks) no larger than a limit
that the error names, and JSON too deeply nested to parse is refused. Every error names the file and
what it was expected to hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path

from minisbert.errors import ConfigError, ModelNotFoundError

# A config is a few KB; 16 MiB leaves room for any real one. Tokenizer files: the largest
# tokenizer.json of a public multilingual model is ~20 MB (XLM-R's 250k pieces); 256 MiB is generous.
CONFIG_LIMIT = 16 << 20
TOKENIZER_LIMIT = 256 << 20
# A weights file is mapped or checked record by record, never read whole, but it is bounded too: the
# largest single file of a public sentence encoder is a few GB, and larger models come in shards.
WEIGHTS_LIMIT = 64 << 30


def regular_file(path: Path, what: str, limit: int) -> int:
    """The size of ``path``, checked: it exists, is a regular file (symlinks followed) and holds at most
    ``limit`` bytes. A FIFO, device or folder is refused before anything opens it."""
    try:
        info = os.stat(path)  # follows symlinks: a link to /dev/zero is a character device here
    except FileNotFoundError:
        if os.path.islink(path):  # present, but pointing nowhere: not the same as absent (a default)
            raise ModelNotFoundError(f"{path}: the {what} is a broken symbolic link (to {os.readlink(path)})") from None
        raise ModelNotFoundError(f"{path}: missing {what}") from None
    except OSError as e:
        raise ConfigError(f"{path}: unreadable {what} ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: the {what} is not a regular file (a folder, FIFO or device); refused")
    if info.st_size > limit:
        raise ConfigError(f"{path}: the {what} has {info.st_size} bytes, more than the {limit} minisbert "
                          f"reads for it; refused")
    return info.st_size


def read_bytes(path: Path, what: str, limit: int = CONFIG_LIMIT) -> bytes:
    """The content of a regular file of at most ``limit`` bytes."""
    path = Path(path)
    regular_file(path, what, limit)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # the file may have grown since the check
    except OSError as e:
        raise ConfigError(f"{path}: unreadable {what} ({e.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: the {what} has more than {limit} bytes; refused")
    return data


def read_text(path: Path, what: str, limit: int = CONFIG_LIMIT) -> str:
    """A UTF-8 text file (``read_bytes``'s limits); undecodable bytes are an error naming the place."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(text: str | bytes, where: str, what: str):
    """Parsed JSON; invalid or too deeply nested JSON (the parser recurses once per level and gives up
    with RecursionError) is a ConfigError naming ``where``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where}: the {what} nests too deeply to parse; refused") from None
    except ValueError as e:
        raise ConfigError(f"{where}: the {what} is not valid JSON ({e})") from None


_MISSING = object()


def read_json(path: Path, what: str, *, default=_MISSING, expect: type = dict, limit: int = CONFIG_LIMIT):
    """A JSON file holding an ``expect`` (dict or list). A missing file returns ``default`` when one is
    given, else raises ModelNotFoundError; every other problem is a ConfigError naming the file."""
    path = Path(path)
    if default is not _MISSING and not os.path.lexists(path):
        return default
    value = parse_json(read_text(path, what, limit), str(path), what)
    if not isinstance(value, expect):
        kind = "a JSON object" if expect is dict else "a JSON list" if expect is list else expect.__name__
        raise ConfigError(f"{path}: the {what} must be {kind}, not {type(value).__name__}")
    return value


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, fsync: bool = False):
    """A temporary path beside ``target`` to write to; renamed over ``target`` when the block ends without
    an error (a failure leaves an existing file as it was), with the permissions a plain ``open`` would
    give (0666 less the umask: temporary files, and safetensors' own writes, are 0600). ``fsync``: the
    data reaches the disk before the rename (a part file other machines will read)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomically(target: str | os.PathLike, write) -> None:
    """``write(binary file)`` into ``target`` through ``atomic_path``."""
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        write(f)
