"""``minisbert serve``: the flags (every limit of ``ServeConfig``, its default shown) and uvicorn.

uvicorn imports the app through ``app.app_from_environment`` in each of ``--workers`` processes (they
share the listening socket and the cores: cores / workers torch threads each); SIGTERM or Ctrl-C stops
taking connections, answers the open requests (up to ``--request-timeout``), then exits.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from minisbert.checks import DTYPES, QUANTIZE, check_device, check_quantize, command_line_int, parse_dtype
from minisbert.errors import MissingDependencyError
from minisbert.io import hub
from minisbert.serve.config import API_KEY_VARIABLE, ServeConfig

positive_int = command_line_int()
DEFAULTS = ServeConfig(model="", model_name="")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--model", required=True, help="model folder, short name from weights/models.json, or hub id")
    p.add_argument("--model-name", help="the name /v1/models and responses give (default: the folder's name)")
    p.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=d.port, help="TCP port")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_VARIABLE} if set, "
                                     f"else no auth)")
    p.add_argument("--workers", type=positive_int, default=d.workers,
                   help="processes, each with a model and cores / N torch threads")
    p.add_argument("--threads", type=positive_int, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--device", default=d.device, help="torch device: cpu, cuda, ...")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES), help="weights' dtype")
    p.add_argument("--quantize", choices=QUANTIZE, help="int8 linear layers on the CPU: faster, inexact")
    p.add_argument("--max-seq-length", type=command_line_int(2), help="tokens per text (default: the model's own)")
    g = p.add_argument_group("batching")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="texts per forward pass")
    g.add_argument("--max-batch-tokens", type=positive_int, default=d.max_batch_tokens,
                   help="tokens of concurrent requests merged into one batch")
    g.add_argument("--max-wait-ms", type=positive_float, default=d.max_wait_ms,
                   help="how long a batch waits for more requests to join it")
    g = p.add_argument_group("limits (docs/serving.md)")
    g.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes, help="request body: 413 past it")
    g.add_argument("--max-inputs", type=positive_int, default=d.max_inputs, help="texts per request: 413 past it")
    g.add_argument("--max-chars", type=positive_int, default=d.max_chars, help="characters per text: 413 past it")
    g.add_argument("--max-queue", type=positive_int, default=d.max_queue,
                   help="requests waiting for the model: 429 with Retry-After past it")
    g.add_argument("--max-queue-tokens", type=positive_int, default=d.max_queue_tokens,
                   help="tokens waiting for the model: 429 with Retry-After past it")
    g.add_argument("--request-timeout", type=positive_float, default=d.request_timeout,
                   help="seconds to answer a request: 503 with Retry-After past it")
    g.add_argument("--max-connections", type=positive_int, default=d.max_connections,
                   help="open connections: uvicorn answers 503 past it")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info: one line per request)")


def uvicorn_module():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise MissingDependencyError("minisbert serve needs Starlette and uvicorn: "
                                     "pip install 'minisbert[serve]'") from None
    return uvicorn


def run(args) -> int:
    uvicorn = uvicorn_module()
    device, dtype = check_device(args.device), parse_dtype(args.dtype)  # checked before seconds of loading
    check_quantize(args.quantize, device, dtype)
    folder = hub.resolve(args.model)  # a missing model fails here, once, not in every worker
    config = ServeConfig(
        model=str(folder), model_name=args.model_name or Path(str(args.model).rstrip("/")).name,
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        device=args.device, dtype=args.dtype, quantize=args.quantize, max_seq_length=args.max_seq_length,
        workers=args.workers, threads=args.threads, batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
        max_inputs=args.max_inputs, max_chars=args.max_chars, max_queue=args.max_queue,
        max_queue_tokens=args.max_queue_tokens, request_timeout=args.request_timeout,
        max_connections=args.max_connections)
    config.to_environment()
    uvicorn.run("minisbert.serve.app:app_from_environment", factory=True, host=config.host, port=config.port,
                workers=config.workers, log_level=args.log_level, limit_concurrency=config.max_connections,
                timeout_graceful_shutdown=int(config.request_timeout) + 5)
    return 0
