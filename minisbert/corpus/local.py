"""The local engine: every part in this process, or in worker processes that each embed whole parts.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import sys
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from minisbert.corpus.job import (
    CALIBRATION_ROWS,
    CorpusError,
    CorpusSettings,
    Job,
    Part,
    finish,
    manifest,
    part_written,
    prepare_output,
    write_manifest,
)
from minisbert.corpus.parts import do_part, load_encoder
from minisbert.corpus.readers import plan, read_part
from minisbert.encoder import SentenceEncoder
from minisbert.encoding.workers import threads_per_worker

log = logging.getLogger("minisbert")


def calibrate(job: Job, encoder: SentenceEncoder, batch_size: int) -> Job:
    """int8/uint8: per-dimension (min, max) over the first ``CALIBRATION_ROWS`` good rows' embeddings."""
    if not job.settings.precision.endswith("int8") or job.ranges is not None:
        return job
    texts = []
    for part in job.parts():
        texts += read_part(job, part).texts
        if len(texts) >= CALIBRATION_ROWS:
            break
    texts = texts[:CALIBRATION_ROWS]
    if len(texts) < 2:
        raise CorpusError(f"precision={job.settings.precision!r} needs at least 2 rows to compute its ranges")
    emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=job.settings.normalize,
                         show_progress_bar=False)
    return replace(job, ranges=np.stack([emb.min(axis=0), emb.max(axis=0)]).tolist())


def start(job: Job, encoder: SentenceEncoder, batch_size: int = 32) -> Job:
    """A planned, prepared job completed from the driver's encoder (dimension; int8/uint8 ranges unless a
    resumed manifest had them), its manifest written before any part."""
    job = calibrate(replace(job, dimension=encoder.get_sentence_embedding_dimension()), encoder, batch_size)
    write_manifest(job, manifest(job))
    return job


def progress_bar(job: Job, done: int, show: bool | None):
    show = sys.stderr.isatty() if show is None else show
    return tqdm(total=job.rows, initial=done, unit="row", desc="embed-corpus", disable=not show, smoothing=0.1)



def run_local(job: Job, encoder: SentenceEncoder, batch_size: int = 32, workers: int = 1,
              show_progress: bool | None = None) -> dict:
    """Embed the parts not yet written: one after the other in this process with ``encoder``
    (``workers=1``), or by ``workers`` worker processes (``part_worker``); then ``finish``."""
    todo = [p for p in job.parts() if part_written(job, p) is None]
    bar = progress_bar(job, job.rows - sum(p.rows for p in todo), show_progress)
    try:
        if workers == 1:
            for part in todo:
                do_part(job, part, encoder, batch_size)
                bar.update(part.rows)
        elif todo:
            for part in run_workers(job, todo, workers, batch_size, str(encoder.device)):
                bar.update(part.rows)
    finally:
        bar.close()
    return dict(finish(job), parts_embedded=len(todo))


def run_workers(job: Job, todo: list[Part], workers: int, batch_size: int, device: str) -> Iterator[Part]:
    """The parts of ``todo`` embedded by ``workers`` spawned processes (at most one per part), each with
    its own encoder and ``cores // workers`` torch threads; yields each part as it is written.

    Spawned, not forked: a forked child inherits torch's OpenMP pool as dead threads and can hang. A
    worker reads, embeds and writes whole parts, so this process only hands out part numbers: no
    texts or embeddings cross between processes. A worker's bad-row error stops the job with its
    message; a worker that dies (killed, out of memory) stops it too, and ``--resume`` goes on."""
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    workers = min(workers, len(todo))
    threads = threads_per_worker(workers)  # the pool's rule: workers x threads <= cores
    for i in range(len(todo)):
        tasks.put(i)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=part_worker, args=(job, todo, batch_size, device, threads, tasks, results),
                         daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    try:
        for _ in todo:
            while True:
                try:
                    i, error = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive() and p.exitcode != 0]
                    if dead:
                        raise CorpusError(f"a worker process died (exit code {dead[0].exitcode}); the parts written "
                                          f"are kept: run again with --resume") from None
            if error:
                raise CorpusError(error)
            yield todo[i]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()


def part_worker(job: Job, todo: list[Part], batch_size: int, device: str, threads: int, tasks, results) -> None:
    """A worker process: one encoder, then each part number it takes from ``tasks`` until None;
    reports (part number, error message or "")."""
    torch.set_num_threads(threads)
    encoder = load_encoder(job.settings, device)
    for i in iter(tasks.get, None):
        try:
            do_part(job, todo[i], encoder, batch_size)
            results.put((i, ""))
        except CorpusError as e:
            results.put((i, str(e)))


def embed_corpus(inputs: list[str], output: str, settings: CorpusSettings, *, resume: bool = False,
                 batch_size: int = 32,
                 workers: int = 1, device: str = "cpu", encoder: SentenceEncoder | None = None,
                 show_progress: bool | None = None) -> dict:
    """``embed-corpus --engine local`` from Python: plan the inputs, check the folder (before the model
    loads), load the encoder (or use ``encoder``, loaded from ``settings.model``), write the manifest,
    embed the missing parts. Returns the final manifest."""
    job = prepare_output(plan(inputs, settings, output), resume)
    encoder = encoder or load_encoder(settings, device)
    return run_local(start(job, encoder, batch_size), encoder, batch_size, workers, show_progress)
