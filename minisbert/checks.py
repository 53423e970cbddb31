"""Argument checks, one implementation of each: every error names the argument and the value it got.

``error`` picks the exception a caller raises (a ``ConfigError`` for a value read from a file, a
``RecipeError`` for a recipe key, ``ValueError`` for a Python argument); ``where`` prefixes the message
with the file or key it came from.
"""

from __future__ import annotations

import argparse
import operator

import torch

from minisbert.errors import ConfigError


def _say(where: str | None, message: str) -> str:
    return f"{where}: {message}" if where else message


def integer(value, name: str, minimum: int = 1, maximum: int | None = None, *, where: str | None = None,
            error: type[Exception] = ValueError) -> int:
    """``value`` as an int in [minimum, maximum] (numpy integers too, never a bool); else ``error``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum or (maximum is not None and number > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise error(_say(where, f"{name}={value!r} must be an integer >= {minimum}{bound}"))
    return number


def positive_int(value, name: str) -> int:
    """``value`` as an int >= 1; a ValueError naming ``name`` otherwise."""
    return integer(value, name)


def command_line_int(minimum: int = 1, why: str = ""):
    """An argparse ``type=`` for integers >= ``minimum`` (argparse prints the error with the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {want}{why}, got {text!r}")
        return value

    parse.__name__ = "integer"  # argparse's "invalid integer value" wording
    return parse


def unknown_keys(given, allowed, what: str, *, where: str | None = None,
                 error: type[Exception] = ConfigError) -> None:
    """Refuse keys of ``given`` outside ``allowed``, naming them and what is allowed."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        allowed_text = ", ".join(sorted(allowed)) or "none"
        raise error(_say(where, f"{what}: unknown or unimplemented keys {unknown} (allowed: {allowed_text})"))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype, or its name (``"float32"``, ``"torch.float16"``, ...); a ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype.removeprefix("torch.")]
    if dtype not in DTYPES.values() and dtype != torch.float64:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)} (or torch.float64)")
    return dtype


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that this machine has; a one-line ValueError otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={str(device)!r}: CUDA is not available ({why}); use the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type not in ("cpu", "meta") and not getattr(torch, device.type, None):
        raise ValueError(f"device={str(device)!r} is not available in this torch build")
    return device


QUANTIZE = ("int8",)


def check_quantize(quantize: str | None, device: torch.device, dtype: torch.dtype) -> str | None:
    """``quantize`` if this model can run it, else a ValueError saying why: int8 runs on the CPU, in float32."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE} (or None: exact float)")
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(f"quantize={quantize!r} runs on the CPU with dtype=torch.float32 (weights and "
                         f"activations are quantized from fp32), not on {device} in {dtype}")
    return quantize
