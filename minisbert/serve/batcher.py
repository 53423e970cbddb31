"""Dynamic batching: concurrent requests wait in one bounded queue, and one task merges them into
batches for the model, which runs in a worker thread while the event loop keeps taking requests.

A batch starts with the oldest waiting request and takes the next ones while they fit ``max_batch_tokens``
and arrive within ``max_wait`` seconds of the first (the only latency batching adds). Requests of
another ``key`` (a prompt the pooling skips) start the next batch. Each request gets its own rows, in
its own order. The queue is bounded twice, in requests and in tokens, so memory under overload stays
flat: a request that does not fit is refused at once (``QueueFull``), never held. A request whose
caller stopped waiting (its timeout) is dropped before it reaches the model. An exception in the model
fails that batch's requests only; the task goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests or ``max_queue_tokens`` tokens already."""


@dataclasses.dataclass
class Job:
    items: list  # one request's inputs (its texts' token ids)
    tokens: int
    key: Hashable  # only jobs of one key share a batch
    future: asyncio.Future


class Batcher:
    """``run(key, items) -> rows`` (one row per item, in order) called from one worker thread on merged
    batches; ``submit`` is what each request awaits."""

    def __init__(self, run: Callable[[Hashable, list], Sequence], max_batch_tokens: int, max_wait: float,
                 max_queue: int, max_queue_tokens: int, on_batch: Callable[[int, int, float], None] | None = None):
        self.run = run
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait
        self.max_queue, self.max_queue_tokens = max_queue, max_queue_tokens
        self.on_batch = on_batch  # (texts, tokens, seconds) of each batch run, for the metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue()  # bounded by the counts below, checked in submit
        self.queued = 0  # requests waiting (the held one included)
        self.queued_tokens = 0
        self.held: Job | None = None  # taken from the queue but left for the next batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minisbert-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, items: list, tokens: int, key: Hashable = 0, timeout: float | None = None) -> Sequence:
        """The rows of ``items``; ``QueueFull`` at once if the queue cannot take them, ``TimeoutError``
        after ``timeout`` seconds, or the model's exception for this batch."""
        # A request larger than the token bound is still taken into an empty queue (it runs alone).
        if self.queued >= self.max_queue or (self.queued and self.queued_tokens + tokens > self.max_queue_tokens):
            raise QueueFull(f"{self.queued} requests ({self.queued_tokens} tokens) are waiting")
        job = Job(items, tokens, key, asyncio.get_running_loop().create_future())
        self.queued += 1
        self.queued_tokens += tokens
        self.queue.put_nowait(job)
        # wait_for cancels the future on timeout: the loop then drops the job unrun.
        return await asyncio.wait_for(job.future, timeout)

    def take(self, job: Job) -> None:
        self.queued -= 1
        self.queued_tokens -= job.tokens

    async def next_job(self, deadline: float | None) -> Job | None:
        """The next waiting job still wanted, waiting until ``deadline`` (None: for ever)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.held is not None:
                job, self.held = self.held, None
            elif deadline is None:
                job = await self.queue.get()
            else:
                try:
                    job = self.queue.get_nowait() if loop.time() >= deadline else \
                        await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    return None
            if not job.future.done():
                return job
            self.take(job)  # its caller gave up: never run

    async def collect(self) -> list[Job]:
        """One batch: the oldest job, then those that fit its token budget and key before the wait ends."""
        first = await self.next_job(None)
        batch, tokens = [first], first.tokens
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while tokens < self.max_batch_tokens:
            job = await self.next_job(deadline)
            if job is None:
                break
            if job.key != first.key or tokens + job.tokens > self.max_batch_tokens:
                self.held = job
                break
            batch.append(job)
            tokens += job.tokens
        for job in batch:
            self.take(job)
        return batch

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.collect()
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            items = [item for job in batch for item in job.items]
            started = loop.time()
            try:
                rows = await loop.run_in_executor(self.executor, self.run, batch[0].key, items)
            except Exception as e:  # the model failed: these requests fail, the next batch runs
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(items), sum(job.tokens for job in batch), loop.time() - started)
            start = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(rows[start: start + len(job.items)])
                start += len(job.items)
