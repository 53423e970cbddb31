"""The two request bodies the server speaks, checked field by field, and their responses.

- OpenAI ``POST /v1/embeddings``: ``input`` (a string or a list of strings; token-id arrays are refused),
  ``model`` (a string, not checked: one model per server), ``encoding_format`` (``float`` or ``base64``:
  little-endian float32, as OpenAI's client decodes it), ``dimensions`` (the first N dimensions,
  renormalised when the model ends in Normalize, as OpenAI's shortened embeddings are), ``user``
  (ignored), and ``prompt_name`` (ours: one of the model's prompts).
- text-embeddings-inference ``POST /embed``: ``inputs`` (a string or a list of strings), ``normalize``
  (default true), ``truncate`` (default true; false refuses a text longer than max_seq_length),
  ``prompt_name``, ``dimensions``.

Every refusal is an ``ApiError`` with the status and a message naming the field (and the limit).
"""

from __future__ import annotations

import base64
import dataclasses

import numpy as np


class ApiError(Exception):
    """An HTTP error: ``status``, a message naming the field at fault, and headers (Retry-After, ...)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    @property
    def kind(self) -> str:
        """OpenAI's error ``type`` (and TEI's ``error_type``) for the status."""
        return {401: "authentication_error", 413: "payload_too_large", 429: "overloaded",
                503: "unavailable"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")


@dataclasses.dataclass(frozen=True)
class EmbedRequest:
    """What either body asks for, checked: texts, and what to do with their embeddings."""

    texts: list[str]
    prompt_name: str | None
    normalize: bool  # unit length after the cut (the model's own Normalize runs anyway)
    dimensions: int | None  # keep the first N dimensions (None: all)
    truncate: bool = True  # cut texts at max_seq_length (False: refuse longer ones)
    base64: bool = False  # OpenAI's encoding_format="base64"


def texts_field(body: dict, field: str, max_inputs: int, max_chars: int) -> list[str]:
    """``body[field]`` as a non-empty list of strings within the limits; a string is a list of one."""
    if field not in body:
        raise ApiError(422, f"'{field}' is required: a string or a list of strings", field)
    value = body[field]
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise ApiError(422, f"'{field}' must be a string or a list of strings, got {type(value).__name__}", field)
    if not texts:
        raise ApiError(422, f"'{field}' must not be empty", field)
    if len(texts) > max_inputs:
        raise ApiError(413, f"'{field}' has {len(texts)} texts; at most {max_inputs} per request (--max-inputs)", field)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            if isinstance(text, int) or (isinstance(text, list) and all(isinstance(t, int) for t in text)):
                raise ApiError(422, f"'{field}[{i}]': token-id arrays are not supported; send the text", field)
            raise ApiError(422, f"'{field}[{i}]' must be a string, got {type(text).__name__}", field)
        if len(text) > max_chars:
            raise ApiError(413, f"'{field}[{i}]' has {len(text)} characters; at most {max_chars} per text "
                                f"(--max-chars)", field)
    return texts


def optional(body: dict, field: str, kind: type, default=None):
    """``body[field]`` if present and not null, checked to be of ``kind``; else ``default``."""
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(422, f"'{field}' must be {'an' if kind is int else 'a'} {kind.__name__}, got "
                            f"{type(value).__name__}", field)
    return value


def dimensions_field(body: dict, width: int) -> int | None:
    dimensions = optional(body, "dimensions", int)
    if dimensions is not None and not 1 <= dimensions <= width:
        raise ApiError(422, f"'dimensions'={dimensions} must be between 1 and the model's {width}", "dimensions")
    return dimensions


def openai_request(body: dict, width: int, max_inputs: int, max_chars: int, normalizes: bool) -> EmbedRequest:
    """``POST /v1/embeddings``'s body; ``normalizes``: the model ends in Normalize, so a cut is renormalised."""
    texts = texts_field(body, "input", max_inputs, max_chars)
    optional(body, "model", str)
    optional(body, "user", str)
    encoding = optional(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(422, f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    dimensions = dimensions_field(body, width)
    return EmbedRequest(texts, optional(body, "prompt_name", str), normalize=normalizes and dimensions is not None,
                        dimensions=dimensions, base64=encoding == "base64")


def tei_request(body: dict, width: int, max_inputs: int, max_chars: int) -> EmbedRequest:
    """``POST /embed``'s body."""
    texts = texts_field(body, "inputs", max_inputs, max_chars)
    return EmbedRequest(texts, optional(body, "prompt_name", str), normalize=optional(body, "normalize", bool, True),
                        dimensions=dimensions_field(body, width), truncate=optional(body, "truncate", bool, True))


def encode_base64(row: np.ndarray) -> str:
    """One embedding as OpenAI's ``base64`` format: little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")


def openai_response(request: EmbedRequest, rows: np.ndarray, model: str, tokens: int) -> dict:
    """OpenAI's embeddings response; ``tokens``: the texts' tokens, prompt and [CLS]/[SEP] included."""
    data = [{"object": "embedding", "index": i,
             "embedding": encode_base64(row) if request.base64 else row.tolist()} for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def error_body(error: ApiError, tei: bool) -> dict:
    """OpenAI's error shape, or text-embeddings-inference's for its routes."""
    if tei:
        return {"error": error.message, "error_type": error.kind}
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}
