"""Worker processes for ``SentenceEncoder.encode``: sentence-transformers' multi-process pool.

``start(encoder, devices)`` starts one worker per device and returns the pool,
``{"input": queue, "output": queue, "processes": [...], "threads": n}``; ``encode(encoder, texts,
pool=...)`` cuts the texts into chunks, queues them with their index, and puts the results back in
input order; ``stop(pool)`` ends the workers and leaves none running.

- **spawn, not fork**: a forked child inherits torch's OpenMP pool and the tokenizers library's
  threads as dead copies and can hang in its first parallel region; a spawned one starts clean.
- **Shared weights**: the encoder's tensors are moved to shared memory first, so every worker maps
  the parent's weights instead of copying them (what a pickled tensor in shared memory becomes in
  torch's multiprocessing). The packed fast path is rebuilt in each worker (its prepacked weights
  are per process).
- **Threads**: each worker runs ``cores // workers`` torch threads (at least one) and a single
  tokenizer thread, so workers x threads stays within the cores this process may use; the
  encoder is unpickled in the worker after the thread count is set.
- **Errors**: an exception in a worker comes back with its chunk and is raised in the caller, with
  its type and message and the worker's traceback as its cause (one that cannot be pickled
  becomes a RuntimeError carrying that traceback). Every chunk's result is collected before
  raising, so the pool stays usable. A worker that dies without a word (killed, out of memory) is
  noticed and reported instead of waited for forever.

Chunks default to sentence-transformers' size, ``ceil(texts / workers / 10)`` (at most 5000), so
work spreads evenly; results are gathered before ``encode`` quantizes, so int8 ranges come from
all the embeddings, as in one process.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import queue
import traceback
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from minisbert.checks import positive_int
from minisbert.encoding.inference import run_here

log = logging.getLogger("minisbert")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_devices() -> list[str]:
    """sentence-transformers' default: every CUDA device, else CPU workers (4 there; here at most one
    per core, since each must have a core to itself)."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"] * max(1, min(4, usable_cores()))


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` processes: the cores shared out, at least one each."""
    return max(1, usable_cores() // workers)


def start(encoder, devices: list[str] | None = None) -> dict:
    """Start one worker per device (``"cpu"``, ``"cuda:1"``, ...) holding a copy of ``encoder`` whose
    weights are shared with this process. The encoder is moved to the CPU first, as
    sentence-transformers does (each worker moves its own copy to its device)."""
    devices = default_devices() if devices is None else [str(d) for d in devices]
    if not devices:
        raise ValueError("start_multi_process_pool needs at least one device")
    cores = usable_cores()
    threads = threads_per_worker(len(devices))
    if len(devices) > cores:
        log.warning("%d workers on %d cores: each runs one thread, and they share the cores", len(devices), cores)
    encoder.to("cpu")
    for module in encoder.pipeline():
        module.share_memory()
    ctx = mp.get_context("spawn")
    inputs, outputs = ctx.Queue(), ctx.Queue()
    processes = []
    for device in devices:
        # Pickled per worker: a tensor in shared memory travels as a file descriptor handed over once.
        payload = bytes(ForkingPickler.dumps(encoder))
        p = ctx.Process(target=worker, args=(device, threads, payload, inputs, outputs), daemon=True)
        p.start()
        processes.append(p)
    log.info("started %d encoder workers on %s, %d thread(s) each", len(devices), ", ".join(devices), threads)
    return {"input": inputs, "output": outputs, "processes": processes, "threads": threads}


def stop(pool: dict) -> None:
    """Terminate and reap every worker and close the queues."""
    for p in pool["processes"]:
        p.terminate()
    for p in pool["processes"]:
        p.join()
        p.close()
    pool["input"].cancel_join_thread()
    pool["input"].close()
    pool["output"].close()


def encode(encoder, texts: list[str], pool: dict | None = None, devices: list | None = None,
           chunk_size: int | None = None, **inference):
    """``run_here(encoder, texts, **inference)`` (``minisbert.encoding.inference``) run by the pool's
    workers (a temporary pool on ``devices`` when no pool is given): (N, D) embeddings on the CPU, or a
    list for token embeddings and features."""
    if chunk_size is not None:
        positive_int(chunk_size, "chunk_size")
    if not texts:
        return []
    show_progress_bar = inference.pop("show_progress_bar", None)
    inference["show_progress_bar"] = False
    own_pool = pool is None
    if own_pool:
        pool = start(encoder, devices)
    try:
        if chunk_size is None:
            chunk_size = max(1, min(math.ceil(len(texts) / len(pool["processes"]) / 10), 5000))
        starts = range(0, len(texts), chunk_size)
        for chunk_id, s in enumerate(starts):
            pool["input"].put([chunk_id, texts[s: s + chunk_size], inference])
        results = [None] * len(starts)
        for _ in tqdm(starts, desc="Chunks", disable=not show_progress_bar):
            chunk_id, result = next_result(pool)
            results[chunk_id] = result
        for result in results:
            if isinstance(result, Failure):
                raise result.error from RemoteTraceback(result.traceback)
        if isinstance(results[0], torch.Tensor):
            return torch.cat(results)
        return [item for chunk in results for item in chunk]
    finally:
        if own_pool:
            stop(pool)


def next_result(pool: dict, poll: float = 1.0):
    """The next (chunk id, result) from the output queue; a RuntimeError if a worker has died."""
    while True:
        try:
            chunk_id, result = pool["output"].get(timeout=poll)
        except queue.Empty:
            dead = [p for p in pool["processes"] if not p.is_alive()]
            if dead:
                details = ", ".join(f"pid {p.pid} (exit code {p.exitcode})" for p in dead)
                raise RuntimeError(f"{len(dead)} encoder worker(s) died: {details}. Stop the pool and start "
                                   f"a new one.") from None
            continue
        if chunk_id is None:  # a worker could not start: its error, for every chunk
            raise result.error from RemoteTraceback(result.traceback)
        return chunk_id, result


class RemoteTraceback(Exception):
    """The worker's traceback, attached as the cause of the exception raised in the caller."""

    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return "\n\n" + self.args[0]


class Failure:
    """An exception in a worker, sent back as the result of its chunk."""

    def __init__(self, error: BaseException):
        self.traceback = "".join(traceback.format_exception(error))
        try:  # the queue pickles in a background thread, where a failure would be lost
            pickle.loads(pickle.dumps(error))
            self.error = error
        except Exception:  # noqa: BLE001 - any exception that does not survive pickling
            self.error = RuntimeError(f"{type(error).__name__}: {error}")


def worker(device: str, threads: int, payload: bytes, inputs, outputs) -> None:
    """A worker's life: set its threads, unpickle the encoder, move it to ``device``, then encode chunks
    until terminated."""
    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread: the cores are shared out already
    try:
        encoder = pickle.loads(payload)
        if torch.empty(0, device=device).device != encoder.device:
            encoder.to(device)
    except Exception as e:  # noqa: BLE001 - reported to the caller instead of dying silently
        outputs.put([None, Failure(e)])
        return
    while True:
        chunk_id, texts, inference = inputs.get()
        try:
            with torch.inference_mode():
                result = to_cpu(run_here(encoder, texts, **inference))
        except Exception as e:  # noqa: BLE001 - every error goes back to the caller
            outputs.put([chunk_id, Failure(e)])
        else:
            outputs.put([chunk_id, result])


def to_cpu(value):
    """Tensors (also inside lists and dicts) on the CPU, so that they can travel to the caller."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    return value
