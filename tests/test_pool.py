"""The multi-process pool (minisbert/encoding/workers.py): spawned workers give the embeddings one process gives,
in input order; their errors reach the caller with their message; stopping leaves no process."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from conftest import corpus, make_checkpoint, st_model

from minisbert import SentenceEncoder
from minisbert.encoding.workers import usable_cores

TOL = 1e-5
TEXTS = corpus(90, seed=21) + ["", "짧다"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return SentenceEncoder.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("bert"), "bert"))


@pytest.fixture(scope="module")
def pool(encoder):
    pool = encoder.start_multi_process_pool(["cpu", "cpu"])
    yield pool
    encoder.stop_multi_process_pool(pool)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pool_gives_one_process_embeddings_in_order(encoder, pool):
    assert pool["threads"] * len(pool["processes"]) <= max(usable_cores(), len(pool["processes"]))
    want = encoder.encode(TEXTS)
    for chunk_size in (None, 1, 7, 1000):  # chunks come back in any order; results follow the input
        got = encoder.encode(TEXTS, pool=pool, chunk_size=chunk_size)
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL, chunk_size
    reversed_texts = TEXTS[::-1]
    assert np.abs(encoder.encode(reversed_texts, pool=pool, chunk_size=5) - want[::-1]).max() <= TOL
    # The rest of encode's surface goes through the pool too, as in sentence-transformers.
    binary = encoder.encode(TEXTS, pool=pool, precision="ubinary")
    assert np.array_equal(binary, encoder.encode(TEXTS, precision="ubinary"))
    tokens = encoder.encode(TEXTS[:9], pool=pool, chunk_size=2, output_value="token_embeddings")
    want_tokens = encoder.encode(TEXTS[:9], output_value="token_embeddings")
    assert all(torch.allclose(a, b, atol=TOL) for a, b in zip(tokens, want_tokens))
    single = encoder.encode(TEXTS[3], pool=pool)
    assert single.shape == want[3].shape and np.abs(single - want[3]).max() <= TOL
    tensor = encoder.encode(TEXTS, pool=pool, convert_to_tensor=True, normalize_embeddings=True, truncate_dim=16)
    assert tensor.shape == (len(TEXTS), 16) and torch.allclose(tensor.norm(dim=1), torch.ones(len(TEXTS)))
    assert encoder.encode([], pool=pool).shape == (0,)
    with pytest.raises(ValueError, match="chunk_size"):
        encoder.encode(TEXTS, pool=pool, chunk_size=0)


def test_pool_equals_sentence_transformers_pool(tmp_path):
    """The same call on sentence-transformers' own pool."""
    folder = make_checkpoint(tmp_path / "m", "roberta")
    ours = SentenceEncoder.from_pretrained(folder)
    ref = st_model(folder)
    ref_pool = ref.start_multi_process_pool(["cpu"])
    our_pool = ours.start_multi_process_pool(["cpu"])
    try:
        want = ref.encode(TEXTS, pool=ref_pool, chunk_size=10, prompt="질문: ")
        got = ours.encode(TEXTS, pool=our_pool, chunk_size=10, prompt="질문: ")
        assert np.abs(got - want).max() <= TOL
    finally:
        ref.stop_multi_process_pool(ref_pool)
        ours.stop_multi_process_pool(our_pool)


def test_device_list_starts_and_stops_its_own_pool(encoder):
    before = set(multiprocessing.active_children())
    got = encoder.encode(TEXTS, device=["cpu", "cpu"], chunk_size=20)
    assert np.abs(got - encoder.encode(TEXTS)).max() <= TOL
    assert set(multiprocessing.active_children()) == before


def test_worker_errors_surface_with_their_message(encoder):
    # A worker on the meta device runs the forward (shapes only), then cannot copy the result out.
    pool = encoder.start_multi_process_pool(["meta"])
    try:
        for _ in range(2):  # the pool stays usable after a failed call: no result is left behind
            with pytest.raises(NotImplementedError, match="meta tensor") as info:
                encoder.encode(TEXTS, pool=pool, chunk_size=10)
            assert "Traceback" in str(info.value.__cause__)  # the worker's own traceback
    finally:
        encoder.stop_multi_process_pool(pool)
    with pytest.raises((RuntimeError, AssertionError), match="(?i)cuda|device"):
        encoder.encode(TEXTS, device=["cuda:99"])  # a worker that cannot start says why


def test_a_dead_worker_is_reported_not_waited_for(encoder):
    pool = encoder.start_multi_process_pool(["cpu"])
    try:
        encoder.encode(TEXTS[:4], pool=pool)  # started
        os.kill(pool["processes"][0].pid, signal.SIGKILL)
        pool["processes"][0].join()
        with pytest.raises(RuntimeError, match="died"):
            encoder.encode(TEXTS, pool=pool)
    finally:
        encoder.stop_multi_process_pool(pool)


def test_stop_leaves_no_process(encoder):
    pool = encoder.start_multi_process_pool(["cpu", "cpu"])
    pids = [p.pid for p in pool["processes"]]
    encoder.encode(TEXTS[:10], pool=pool)
    encoder.stop_multi_process_pool(pool)
    assert all(gone(pid) for pid in pids)
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


def test_default_devices_share_the_cores():
    from minisbert.encoding.workers import default_devices, threads_per_worker

    if not torch.cuda.is_available():
        assert default_devices() == ["cpu"] * max(1, min(4, usable_cores()))
    for workers in range(1, usable_cores() + 1):
        assert 1 <= threads_per_worker(workers) and workers * threads_per_worker(workers) <= usable_cores()
    assert threads_per_worker(usable_cores() + 1) == 1
