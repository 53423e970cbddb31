"""The server: Starlette routes over one encoder, its requests merged by the ``Batcher``.

A request goes: bearer token checked (constant time) -> body read up to ``max_body_bytes`` -> fields
checked (``protocol``) -> texts tokenized in the tokenizer thread (the token counts are the usage and
the batcher's budget) -> queued -> embedded with others in the model thread -> its rows cut to
``dimensions`` and normalised as ``encode`` does -> answered. A text's embedding does not depend on the
others in its batch (``fast/linear.py``'s fixed GEMM shapes), so the server returns what
``SentenceEncoder.encode`` returns, to the byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from minisbert.encoder import SentenceEncoder
from minisbert.encoding.workers import threads_per_worker
from minisbert.modules.layers import Normalize
from minisbert.serve import protocol
from minisbert.serve.batcher import Batcher, QueueFull
from minisbert.serve.config import ServeConfig
from minisbert.serve.metrics import Metrics
from minisbert.serve.protocol import ApiError, EmbedRequest
from minisbert.text.tokenizer import clean_text

log = logging.getLogger("minisbert.serve")
RETRY_AFTER = "1"  # seconds a refused client should wait: a batch takes well under that


class Model:
    """The encoder as the server runs it: a request's texts -> token ids (tokenizer thread), merged
    batches of ids -> (n, D) rows in the model's dtype (model thread), a request's rows -> its answer."""

    def __init__(self, encoder: SentenceEncoder, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size
        self.normalizes = any(isinstance(m, Normalize) for m in encoder.head_modules)

    def tokenize(self, request: EmbedRequest) -> tuple[list[list[int]], int]:
        """The request's token ids (its prompt in front, cut at max_seq_length) and the prompt tokens the
        pooling skips (``include_prompt: false``; 0 otherwise): what the batcher merges by."""
        encoder = self.encoder
        try:
            prompt = encoder.resolve_prompt(prompt_name=request.prompt_name)
        except ValueError as e:
            raise ApiError(422, f"'prompt_name': {e}", "prompt_name") from None
        prompted = [prompt + text for text in request.texts]
        ids = encoder.tokenizer.encode_ids(prompted)
        if not request.truncate:
            self.refuse_long(prompted, ids)
        skip = encoder.prompt_length(prompt) if prompt and not encoder.pooling.include_prompt else 0
        return ids, skip

    def refuse_long(self, prompted: list[str], ids: list[list[int]]) -> None:
        """``truncate: false``: a 413 for the first text the tokenizer had to cut."""
        limit, rust = self.encoder.max_seq_length, getattr(self.encoder.tokenizer, "tokenizer", None)
        if rust is None or not hasattr(rust, "encode"):
            raise ApiError(422, "'truncate': false is not supported for this model's tokenizer; texts are cut at "
                                f"max_seq_length={limit}", "truncate")
        for i, row in enumerate(ids):
            if len(row) == limit and rust.encode(clean_text(prompted[i])).overflowing:
                raise ApiError(413, f"'inputs[{i}]' has more than max_seq_length={limit} tokens and 'truncate' "
                                    f"is false", "inputs")

    @torch.inference_mode()
    def embed(self, skip: int, ids: list[list[int]]) -> torch.Tensor:
        """(n, D) embeddings after the model's own modules, uncut and unnormalised, on the host. Longest
        first, in the runner's batches (its token budget), as ``encode`` runs them."""
        encoder, n = self.encoder, len(ids)
        order = sorted(range(n), key=lambda i: -len(ids[i]))
        ordered = [ids[i] for i in order]
        if skip:  # only the reference forward skips prompt tokens: batch_size texts at a time
            batches = [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]
        else:
            batches = encoder.runner.batches(ordered, self.batch_size, encoder.max_seq_length)
        out = torch.empty((n, encoder.embedding_dim), dtype=encoder.dtype)
        for batch in batches:
            out[[order[i] for i in batch]] = encoder.embed_ids([ordered[i] for i in batch], skip=skip).cpu()
        return out

    def finish(self, request: EmbedRequest, rows: torch.Tensor) -> np.ndarray:
        """A request's (n, D) rows cut to its width, then unit length if asked, as ``encode`` cuts them;
        float32 (numpy has no bfloat16)."""
        encoder = self.encoder
        width = min(encoder.embedding_dim, request.dimensions or encoder.truncate_dim or encoder.embedding_dim)
        rows = rows[:, :width]
        if request.normalize:
            rows = F.normalize(rows, p=2, dim=1)
        return rows.float().numpy()


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past ``limit`` bytes (read no further), 400 if it is not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body has {length} bytes; at most {limit} (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body has more than {limit} bytes (--max-body-bytes)")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value


class Server:
    """The routes' state: the model, the batcher (made in the event loop at startup), the metrics."""

    def __init__(self, config: ServeConfig, encoder: SentenceEncoder):
        self.config, self.model, self.metrics = config, Model(encoder, config.batch_size), Metrics()
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minisbert-tokenizer")
        self.batcher: Batcher | None = None

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    async def embed(self, request: Request, tei: bool) -> Response:
        started = time.monotonic()
        route = "/embed" if tei else "/v1/embeddings"
        config, encoder = self.config, self.model.encoder
        try:
            self.authorize(request)
            body = await read_json(request, config.max_body_bytes)
            width = encoder.embedding_dim
            if tei:
                asked = protocol.tei_request(body, width, config.max_inputs, config.max_chars)
            else:
                asked = protocol.openai_request(body, width, config.max_inputs, config.max_chars, self.model.normalizes)
            loop = asyncio.get_running_loop()
            ids, skip = await loop.run_in_executor(self.tokenizer_pool, self.model.tokenize, asked)
            tokens = sum(len(row) for row in ids)
            left = config.request_timeout - (time.monotonic() - started)
            if left <= 0:
                raise asyncio.TimeoutError
            rows = self.model.finish(asked, await self.batcher.submit(ids, tokens, key=skip, timeout=left))
            if tei:
                response = JSONResponse(rows.tolist())
            else:
                response = JSONResponse(protocol.openai_response(asked, rows, config.model_name, tokens))
        except ApiError as e:
            response = JSONResponse(protocol.error_body(e, tei), e.status, headers=e.headers)
        except QueueFull as e:
            error = ApiError(429, f"the server is busy ({e}); retry after {RETRY_AFTER} s",
                             headers={"Retry-After": RETRY_AFTER})
            response = JSONResponse(protocol.error_body(error, tei), 429, headers=error.headers)
        except asyncio.TimeoutError:
            error = ApiError(503, f"not answered within {config.request_timeout:g} s (--request-timeout)",
                             headers={"Retry-After": RETRY_AFTER})
            response = JSONResponse(protocol.error_body(error, tei), 503, headers=error.headers)
        except Exception as e:  # the model failed on this request's batch; the server goes on
            log.exception("embedding failed")
            error = ApiError(500, f"embedding failed: {type(e).__name__}: {e}")
            response = JSONResponse(protocol.error_body(error, tei), 500)
        self.metrics.request(route, response.status_code, time.monotonic() - started)
        return response

    async def openai(self, request: Request) -> Response:
        return await self.embed(request, tei=False)

    async def tei(self, request: Request) -> Response:
        return await self.embed(request, tei=True)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def guarded(self, request: Request, answer) -> Response:
        try:
            self.authorize(request)
        except ApiError as e:
            return JSONResponse(protocol.error_body(e, tei=False), e.status, headers=e.headers)
        return answer()

    async def models(self, request: Request) -> Response:
        model = {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "minisbert"}
        return await self.guarded(request, lambda: JSONResponse({"object": "list", "data": [model]}))

    async def prometheus(self, request: Request) -> Response:
        batcher = self.batcher
        return await self.guarded(request, lambda: PlainTextResponse(
            self.metrics.render(batcher.queued, batcher.queued_tokens), media_type="text/plain; version=0.0.4"))

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        config = self.config
        self.batcher = Batcher(self.model.embed, config.max_batch_tokens, config.max_wait_ms / 1000,
                               config.max_queue, config.max_queue_tokens, on_batch=self.metrics.batch)
        self.batcher.start()
        yield
        await self.batcher.stop()  # uvicorn has answered every open request by now
        self.tokenizer_pool.shutdown(wait=True)


def create_app(config: ServeConfig, encoder: SentenceEncoder | None = None) -> Starlette:
    """The ASGI app for ``config``; the encoder is loaded here unless given."""
    torch.set_num_threads(config.threads or threads_per_worker(config.workers))
    if encoder is None:
        encoder = SentenceEncoder.from_pretrained(config.model, device=config.device, dtype=config.dtype,
                                                  quantize=config.quantize)
        if config.max_seq_length:
            encoder.max_seq_length = config.max_seq_length
    encoder.encode(["warm up"])  # the first forward's one-off costs, before the first request
    server = Server(config, encoder)
    routes = [Route("/v1/embeddings", server.openai, methods=["POST"]),
              Route("/embed", server.tei, methods=["POST"]),
              Route("/", server.tei, methods=["POST"]),  # text-embeddings-inference's predict route
              Route("/health", server.health, methods=["GET"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/metrics", server.prometheus, methods=["GET"])]
    return Starlette(routes=routes, lifespan=server.lifespan)


def app_from_environment() -> Starlette:
    """uvicorn's factory in each worker process: the app of the ``ServeConfig`` the command left."""
    return create_app(ServeConfig.from_environment())
