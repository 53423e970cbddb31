"""``minisbert serve`` against real clients: a server started as a subprocess on a free localhost port
with all-MiniLM-L6-v2 (given prompts), called with the official ``openai`` package and
``huggingface_hub.InferenceClient``; equal to ``SentenceEncoder.encode`` (float within 1e-6, base64 the
same bytes). Then hostile requests (each limit, malformed bodies, auth, a full queue, a timeout),
concurrency, SIGTERM, and the batcher itself in-process (merging, a failing model, timeouts)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import REPO, korean_test_sentences

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["A man is playing a guitar.", "", "한국어 문장도 임베딩합니다.", "word " * 400]  # empty, Korean, cut


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``minisbert serve`` in a subprocess; ``url`` once /health answers."""

    def __init__(self, model: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("MINISBERT_API_KEY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minisbert", "serve", "--model", model, "--port", str(self.port),
             "--model-name", "minilm", "--log-level", "warning", *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ready(self) -> "Server":
        """Wait for /health (the model loads first)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("the server did not answer /health within 120 s")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def model_folder(minilm_path, tmp_path_factory) -> str:
    """all-MiniLM-L6-v2 with query/passage prompts, to choose per request."""
    folder = tmp_path_factory.mktemp("minilm_prompts") / "minilm"
    shutil.copytree(minilm_path, folder)
    settings_path = folder / "config_sentence_transformers.json"
    settings = json.loads(settings_path.read_text())
    settings["prompts"] = PROMPTS
    settings_path.write_text(json.dumps(settings))
    return str(folder)


@pytest.fixture(scope="module")
def encoder(model_folder):
    from minisbert import SentenceEncoder

    return SentenceEncoder(model_folder)


@pytest.fixture(scope="module")
def servers(model_folder):
    """Three servers, started at once (each takes seconds to import torch and load): the main one with
    an API key and small limits, one with a queue of one and a tiny timeout, one to stop with SIGTERM."""
    started = {"main": Server(model_folder, "--api-key", KEY, "--max-body-bytes", "65536", "--max-inputs", "16",
                              "--max-chars", "4096", "--max-wait-ms", "20"),
               "tiny": Server(model_folder, "--max-queue", "1", "--max-wait-ms", "300", "--request-timeout", "0.05"),
               "sigterm": Server(model_folder, "--max-wait-ms", "1500")}
    try:
        yield {name: s.ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body, headers=AUTH, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kwargs)


# -- real clients, equal to encode ----------------------------------------------------------------------

def test_openai_client_float_equals_encode(client, encoder):
    got = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    want = encoder.encode(TEXTS)
    assert [d.index for d in got.data] == list(range(len(TEXTS))) and got.model == "minilm"
    diff = np.abs(np.array([d.embedding for d in got.data]) - want).max()
    assert diff <= 1e-6, f"max diff {diff}"
    tokens = sum(len(ids) for ids in encoder.tokenizer.encode_ids(TEXTS))
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens


def test_openai_client_base64_is_encodes_bytes(client, encoder):
    got = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="base64")
    want = encoder.encode(TEXTS)
    for d, row in zip(got.data, want):
        assert base64.b64decode(d.embedding) == row.astype("<f4").tobytes()
    # The client's default asks for base64 and decodes it: the same floats.
    default = client.embeddings.create(model="minilm", input=TEXTS[0])
    assert np.array(default.data[0].embedding, dtype=np.float32).tobytes() == want[0].tobytes()


def test_openai_dimensions_and_prompt(client, encoder):
    got = client.embeddings.create(model="minilm", input=TEXTS, dimensions=64, encoding_format="base64",
                                   extra_body={"prompt_name": "query"})
    # The model ends in Normalize, so the cut vectors are renormalised, as OpenAI's shortened ones are.
    want = encoder.encode(TEXTS, truncate_dim=64, normalize_embeddings=True, prompt_name="query")
    assert [base64.b64decode(d.embedding) for d in got.data] == [row.astype("<f4").tobytes() for row in want]
    tokens = sum(len(ids) for ids in encoder.tokenizer.encode_ids(["query: " + t for t in TEXTS]))
    assert got.usage.prompt_tokens == tokens


def test_huggingface_inference_client(server, encoder, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)  # offline mode refuses localhost too
    client = hub.InferenceClient(base_url=server.url, api_key=KEY)
    got = client.feature_extraction(TEXTS[2], normalize=True, prompt_name="passage")
    want = encoder.encode([TEXTS[2]], normalize_embeddings=True, prompt_name="passage")
    assert got.shape == (1, 384) and np.abs(got - want).max() <= 1e-6
    raw = post(server, "/embed", {"inputs": TEXTS, "normalize": False, "dimensions": 32})
    assert np.abs(np.array(raw.json()) - encoder.encode(TEXTS, truncate_dim=32)).max() <= 1e-6


def test_models_health_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key needed
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "minilm"
    post(server, "/embed", {"inputs": ["metrics"]})
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'minisbert_requests_total{route="/embed",status="200"}' in text
    for name in ("minisbert_queue_requests", "minisbert_batch_texts_count", "minisbert_tokens_per_second",
                 'minisbert_request_seconds_bucket{route="/embed",le="+Inf"}', "minisbert_embedded_tokens_total"):
        assert name in text


# -- hostile requests ----------------------------------------------------------------------------------

def test_auth(server, client):
    openai = pytest.importorskip("openai")
    assert post(server, "/v1/embeddings", {"input": "x"}, headers={}).status_code == 401
    wrong = post(server, "/embed", {"inputs": "x"}, headers={"Authorization": "Bearer " + KEY[:-1] + "X"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(server.url + "/metrics").status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="minilm", input="x")


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/embeddings", b"{not json", 400, "not valid JSON"),
    ("/v1/embeddings", b"[1, 2]", 400, "JSON object"),
    ("/v1/embeddings", {"model": "minilm"}, 422, "'input' is required"),
    ("/v1/embeddings", {"input": 5}, 422, "'input' must be a string or a list"),
    ("/v1/embeddings", {"input": []}, 422, "must not be empty"),
    ("/v1/embeddings", {"input": ["ok", None]}, 422, "'input[1]' must be a string"),
    ("/v1/embeddings", {"input": [[101, 2023, 102]]}, 422, "token-id arrays are not supported"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "binary"}, 422, "'encoding_format'"),
    ("/v1/embeddings", {"input": "x", "dimensions": 0}, 422, "'dimensions'=0"),
    ("/v1/embeddings", {"input": "x", "dimensions": 385}, 422, "the model's 384"),
    ("/v1/embeddings", {"input": "x", "dimensions": True}, 422, "'dimensions' must be an int"),
    ("/v1/embeddings", {"input": "x", "model": 3}, 422, "'model' must be a str"),
    ("/embed", {"inputs": "x", "normalize": "yes"}, 422, "'normalize' must be a bool"),
    ("/embed", {"inputs": "x", "prompt_name": "nope"}, 422, "'prompt_name'"),
    ("/embed", {"inputs": ["x"] * 17}, 413, "at most 16 per request"),
    ("/embed", {"inputs": ["x" * 4097]}, 413, "at most 4096 per text"),
    ("/embed", {"inputs": ["word " * 400], "truncate": False}, 413, "max_seq_length=256"),
    ("/v1/embeddings", {"input": ["y" * 4000] * 16, "pad": "z" * 5000}, 413, "at most 65536"),
])
def test_hostile_requests(server, path, body, status, words):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert words in message, message


def test_oversized_chunked_body(server):
    """A body sent in chunks, without a declared length, is refused once it passes the limit."""
    chunks = (b"{" if i == 0 else b" " * 8192 for i in range(10))
    response = httpx.post(server.url + "/embed", content=chunks, headers=AUTH, timeout=60)
    assert response.status_code == 413 and "more than 65536 bytes" in response.json()["error"]
    assert post(server, "/embed", {"inputs": ["short"], "truncate": False}).status_code == 200


# -- concurrency -------------------------------------------------------------------------------------------

def test_concurrent_requests_get_their_own_rows(server, encoder):
    texts = korean_test_sentences()[:96]
    requests = [texts[i: i + 1 + i % 5] for i in range(0, 90, 3)]  # 30 requests of 1-5 texts, overlapping
    want = {t: row.astype("<f4").tobytes() for t, row in zip(texts, encoder.encode(texts))}
    batches_before = metric(server, "minisbert_batch_texts_count")

    def call(inputs):
        body = post(server, "/v1/embeddings", {"input": inputs, "encoding_format": "base64"}).json()
        return [base64.b64decode(d["embedding"]) for d in body["data"]]

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(call, requests))
    for inputs, rows in zip(requests, results):
        assert rows == [want[t] for t in inputs]
    batches = metric(server, "minisbert_batch_texts_count") - batches_before
    assert batches < len(requests), f"{len(requests)} concurrent requests ran in {batches} batches: none merged"


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# -- a tiny queue and timeout; SIGTERM -------------------------------------------------------------------

def test_queue_full_and_timeout(servers):
    """One request may wait, each waits 0.3 s for company, and each times out after 0.05 s: the first of
    a burst times out (503), the others find the queue full (429); both say when to retry."""
    s = servers["tiny"]
    one = post(s, "/embed", {"inputs": ["alone"]}, headers={})
    assert one.status_code == 503 and "--request-timeout" in one.json()["error"]
    assert one.headers["Retry-After"] == "1"
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda i: post(s, "/v1/embeddings", {"input": f"text {i}"}, headers={}), range(8)))
    codes = [r.status_code for r in burst]
    assert set(codes) <= {429, 503} and 429 in codes, codes
    full = next(r for r in burst if r.status_code == 429)
    assert full.headers["Retry-After"] == "1" and "busy" in full.json()["error"]["message"]


def test_sigterm_answers_the_request_in_flight(servers, encoder):
    s = servers["sigterm"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, s, "/embed", {"inputs": TEXTS, "normalize": False}, {})
        deadline = time.monotonic() + 30
        while metric_plain(s, "minisbert_queue_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.process.send_signal(signal.SIGTERM)  # while the request waits in the batcher
        response = pending.result()
    code = s.process.wait(30)
    assert response.status_code == 200
    assert np.abs(np.array(response.json()) - encoder.encode(TEXTS)).max() <= 1e-6
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down


def metric_plain(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


# -- the batcher in-process ------------------------------------------------------------------------------

def batcher(run, **limits):
    from minisbert.serve.batcher import Batcher

    settings = dict(max_batch_tokens=100, max_wait=0.05, max_queue=8, max_queue_tokens=1000) | limits
    return Batcher(run, **settings)


def test_batcher_merges_splits_and_keeps_order():
    seen = []

    def run(key, items):
        seen.append((key, list(items)))
        return [f"{key}:{x}" for x in items]

    async def main():
        b = batcher(run)
        b.start()
        jobs = [b.submit(["a", "b"], 10), b.submit(["c"], 10), b.submit(["d"], 95), b.submit(["e"], 10, key=1)]
        results = await asyncio.gather(*jobs)
        await b.stop()
        return results

    results = asyncio.run(main())
    assert results == [["0:a", "0:b"], ["0:c"], ["0:d"], ["1:e"]]
    # The first two share a batch; the third would pass the 100-token budget; the fourth has another key.
    assert seen == [(0, ["a", "b", "c"]), (0, ["d"]), (1, ["e"])]


def test_batcher_a_failing_batch_fails_only_its_requests():
    def run(key, items):
        if "boom" in items:
            raise RuntimeError("the model failed")
        return items

    async def main():
        b = batcher(run, max_wait=0.0)
        b.start()
        bad = await asyncio.gather(b.submit(["boom"], 1), return_exceptions=True)
        good = await b.submit(["fine"], 1)
        await b.stop()
        return bad, good

    bad, good = asyncio.run(main())
    assert isinstance(bad[0], RuntimeError) and good == ["fine"]


def test_batcher_bounds_and_timeouts():
    from minisbert.serve.batcher import QueueFull

    ran = []

    def run(key, items):
        ran.extend(items)
        time.sleep(0.2)
        return items

    async def main():
        b = batcher(run, max_queue=2, max_queue_tokens=50, max_wait=0.0)
        b.start()
        first = asyncio.ensure_future(b.submit(["first"], 10))
        await asyncio.sleep(0.05)  # running now: the queue is empty again
        late = asyncio.ensure_future(b.submit(["late"], 10, timeout=0.05))  # gives up before its turn
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(["too many tokens"], 41)
        second = asyncio.ensure_future(b.submit(["second"], 10))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(["third"], 1)  # two requests wait already
        with pytest.raises(asyncio.TimeoutError):
            await late
        assert await first == ["first"] and await second == ["second"]
        await b.stop()

    asyncio.run(main())
    assert ran == ["first", "second"]  # the request whose caller left never reached the model
