"""What a server is set to: the model, where it listens, and every limit, with the flags' defaults.

One frozen dataclass travels from the command line to each uvicorn worker process (as JSON in an
environment variable, since ``--workers N`` imports the app anew in every process)."""

from __future__ import annotations

import dataclasses
import json
import os

CONFIG_VARIABLE = "MINISBERT_SERVE_CONFIG"  # the JSON of a ServeConfig, for the worker processes
API_KEY_VARIABLE = "MINISBERT_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model: str  # folder, short name or hub id, as SentenceEncoder.from_pretrained takes
    model_name: str  # what /v1/models and every response call the model
    host: str = "127.0.0.1"  # loopback unless told otherwise: a server on every interface is a choice
    port: int = 8080
    api_key: str | None = None  # bearer token; None: no auth
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str | None = None
    max_seq_length: int | None = None  # tokens per text (default: the model's own); longer texts are cut
    workers: int = 1  # processes, each with its own model and cores / workers torch threads
    threads: int | None = None  # torch threads per worker (default: cores / workers)
    # -- batching
    batch_size: int = 32  # texts per forward pass inside a merged batch, as encode's batch_size
    max_batch_tokens: int = 16384  # a merged batch stops growing at this many tokens
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others to join it
    # -- limits (docs/serving.md says what each returns)
    max_body_bytes: int = 2 * 1024 * 1024  # 413
    max_inputs: int = 256  # texts per request: 413
    max_chars: int = 16384  # characters per text: 413
    max_queue: int = 256  # requests waiting for the model: beyond, 429 with Retry-After
    max_queue_tokens: int = 262144  # tokens waiting for the model: beyond, 429 with Retry-After
    request_timeout: float = 60.0  # seconds from arrival to answer: beyond, 503 with Retry-After
    max_connections: int = 1024  # open connections (uvicorn's limit_concurrency): beyond, 503

    def to_environment(self) -> None:
        os.environ[CONFIG_VARIABLE] = json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_environment(cls) -> "ServeConfig":
        text = os.environ.get(CONFIG_VARIABLE)
        if not text:
            raise RuntimeError(f"{CONFIG_VARIABLE} is not set: start the server with 'minisbert serve'")
        return cls(**json.loads(text))
