"""minisbert on Ray Data: the ``embed-corpus --engine ray`` engine, and ``Embedder`` for your own pipelines.

Needs the optional extra: ``pip install 'minisbert[ray]'`` (``ray[data]`` and ``pyarrow``). Nothing here
imports Ray until it runs, so the rest of minisbert works without it.

**The engine** (``run_ray``) runs the same parts as the local engine (``minisbert.corpus``): the driver
plans them, Ray Data hands each missing part to an actor pool (``map_batches`` with ``PartWorker``, one
loaded encoder per actor, ``workers`` actors with their CPU/GPU requests), and the actor reads its rows,
embeds them and writes the part file under a temporary name, renamed when complete. Ray restarts a
dead actor and retries its part (Ray Data's defaults for actor pools: ``max_restarts=-1``,
``max_task_retries=-1``); a retried part is written again whole under the same name, so the output
never holds a row twice. Inputs and output must lie on a filesystem every node sees (the same path).

Why parts and not ``ray.data.read_parquet(...)`` / ``write_parquet(...)`` for the engine: Ray's readers
choose block boundaries and order themselves, so a row's position (the default id) and a part's rows
are lost, and with them resuming and the guarantee that a retried write cannot duplicate rows; and
pyarrow's CSV/JSON readers infer types (a CSV column of "123" becomes integers), so the rows would
differ from the local engine's. Reading a part with ``readers.read_part`` gives both engines the same
rows, ids, bad rows and files.

**Your own pipeline**: ``Embedder`` is the callable class to hand to ``map_batches`` after any Ray Data
reader, before any writer::

    import ray
    from minisbert.corpus.ray_engine import Embedder

    ds = ray.data.read_parquet("docs/")                      # any column of texts, here "text"
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": "jhgan/ko-sroberta-multitask"},
                        batch_size=1024, batch_format="pyarrow", num_cpus=2,
                        compute=ray.data.ActorPoolStrategy(size=4))
    ds.write_parquet("embeddings/")                          # every column, plus "embedding"
"""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np
import torch

from minisbert.corpus.job import CorpusError, CorpusSettings, Job, Part, finish, part_written, prepare_output, pyarrow
from minisbert.corpus.local import progress_bar, start
from minisbert.corpus.parts import do_part, embed_texts, embedding_array, load_encoder
from minisbert.corpus.readers import plan
from minisbert.errors import MissingDependencyError


def ray_module():
    """``ray`` with ``ray.data`` loaded; a one-line error naming the extra when it is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401  (the submodule)
    except ImportError:
        raise MissingDependencyError("the Ray engine needs Ray Data: pip install 'minisbert[ray]' "
                                     "(or pip install 'ray[data]' pyarrow)") from None
    return ray


class Embedder:
    """A ``map_batches`` callable class that adds an embedding column to each batch: Ray builds one per
    actor, which loads the encoder once. Batches may be ``pyarrow.Table`` (``batch_format="pyarrow"``:
    the column is a fixed-size list, what ``write_parquet`` stores as a plain list column) or dicts of
    numpy arrays (the default format: a (rows, width) array). Arguments as ``encode`` and
    ``embed-corpus``; int8/uint8 need ``ranges`` ((2, D) min/max), which one batch cannot give for all.
    ``threads``: torch threads in the actor (default: the CPUs Ray gave it)."""

    def __init__(self, model: str, text_column: str = "text", column: str = "embedding", batch_size: int = 32,
                 normalize: bool = False, precision: str = "float32", ranges=None, device: str = "cpu",
                 dtype: str = "float32", max_seq_length: int | None = None, revision: str | None = None,
                 threads: int | None = None):
        settings = CorpusSettings(model, revision=revision, dtype=dtype, max_seq_length=max_seq_length,
                            precision=precision, normalize=normalize, text_column=text_column)
        if precision.endswith("int8") and ranges is None:
            raise CorpusError(f"precision={precision!r} needs ranges: a (2, dimension) array of each dimension's "
                              f"min and max over a sample of the corpus")
        set_threads(threads)
        self.encoder = load_encoder(settings, device)
        self.text_column, self.column, self.batch_size = text_column, column, batch_size
        self.normalize, self.precision, self.ranges = normalize, precision, ranges

    def __call__(self, batch):
        pa = pyarrow()
        table = isinstance(batch, pa.Table)
        texts = batch.column(self.text_column).to_pylist() if table else list(batch[self.text_column])
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise CorpusError(f"{self.text_column!r} of a row in this batch (its row {i}) is "
                                  f"{type(text).__name__}, not a string")
        emb = embed_texts(self.encoder, texts, self.batch_size, self.normalize, self.precision, self.ranges)
        if table:
            return batch.append_column(self.column, embedding_array(emb))
        return {**batch, self.column: emb}


def set_threads(threads: int | None) -> None:
    """torch threads in a Ray worker: ``threads``, else the CPUs Ray assigned (it sets OMP_NUM_THREADS)."""
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


class PartWorker:
    """The engine's ``map_batches`` callable class: one encoder per actor; each input row names a part,
    which the actor reads, embeds and writes (``parts.do_part``). Returns one row per part: its rows
    written and skipped, and the CorpusError's message (a bad row) if it failed: returned as data,
    because Ray hands the driver only the text of an exception raised in an actor."""

    def __init__(self, job: Job, batch_size: int, device: str, threads: int | None):
        set_threads(threads)
        self.job, self.batch_size = job, batch_size
        self.encoder = load_encoder(job.settings, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written, skipped, errors = [], [], []
        for source, index, first_row, rows in zip(batch["source"], batch["index"], batch["first_row"], batch["rows"]):
            part = Part(int(source), int(index), int(first_row), int(rows))
            try:
                n, bad = do_part(self.job, part, self.encoder, self.batch_size)
            except CorpusError as e:
                n, bad = 0, 0
                errors.append(str(e))
            else:
                errors.append("")
            written.append(n)
            skipped.append(bad)
        return {"rows": np.array(written, dtype=np.int64), "bad": np.array(skipped, dtype=np.int64),
                "error": np.array(errors, dtype=object)}


def default_threads(ray, workers: int) -> int:
    """CPUs per actor when not given: the cluster's CPUs shared among the actors, at most one node's."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes) or os.cpu_count() or 1
    return max(1, int(min(total // workers, max(nodes, default=total))))


def run_ray(job: Job, batch_size: int = 32, workers: int = 1, device: str = "cpu", threads: int | None = None,
            address: str | None = None, show_progress: bool | None = None) -> dict:
    """Embed the parts not yet written on a Ray cluster (``address``; default: the one ``RAY_ADDRESS``
    names, else a new local instance), ``workers`` actors of ``threads`` CPUs (and one GPU each when
    ``device`` is CUDA); then ``job.finish``."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows and gives the ETA
    ctx.print_on_execution_start = False
    threads = threads or default_threads(ray, workers)
    todo = [p for p in job.parts() if part_written(job, p) is None]
    bar = progress_bar(job, job.rows - sum(p.rows for p in todo), show_progress)
    try:
        if todo:
            ds = ray.data.from_items([asdict(p) for p in todo], override_num_blocks=len(todo))
            pool = ray.data.ActorPoolStrategy(size=min(workers, len(todo)))
            ds = ds.map_batches(PartWorker, batch_size=1, compute=pool, num_cpus=threads,
                                num_gpus=1 if device.startswith("cuda") else 0,
                                fn_constructor_kwargs={"job": job, "batch_size": batch_size, "device": device,
                                                       "threads": threads})
            for row in ds.iter_rows():
                if row["error"]:
                    raise CorpusError(row["error"])
                bar.update(int(row["rows"]) + int(row["bad"]))
    finally:
        bar.close()
    return dict(finish(job), parts_embedded=len(todo))


def embed_corpus(inputs: list[str], output: str, settings: CorpusSettings, *, resume: bool = False,
                 batch_size: int = 32,
                 workers: int = 1, device: str = "cpu", threads: int | None = None, address: str | None = None,
                 show_progress: bool | None = None) -> dict:
    """``embed-corpus --engine ray`` from Python: as ``local.embed_corpus``, the parts run by ``run_ray``.
    The driver loads the encoder on its CPU once, for the dimension and the int8/uint8 ranges."""
    ray_module()
    job = prepare_output(plan(inputs, settings, output), resume)
    job = start(job, load_encoder(settings, "cpu"), batch_size)
    return run_ray(job, batch_size, workers, device, threads, address, show_progress)
