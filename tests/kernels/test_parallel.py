"""The CPU kernels' own thread pool (csrc/parallel.h): results independent of the thread count, calls
from several Python threads at once, a forked child process (errors raised inside a region: tests/kernels/test_limits.py)."""

import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import locdiff_ext as ld

from helpers import random_coords


def _calls():
    c = random_coords(3000, seed=1)
    coeffs = torch.randn(37, 17 * 17, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return [
        lambda: ld.sh_basis(c, 20),
        lambda: ld.sh_synthesis(coeffs, 16, 36),
        lambda: ld.shdd_decode(coeffs)[0],
    ]


def test_results_do_not_depend_on_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [f() for f in _calls()]
        torch.set_num_threads(3)
        three = [f() for f in _calls()]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_calls_from_several_python_threads_at_once():
    """The kernels release the GIL; a call made while the pool is busy runs on its own thread."""
    calls = _calls()
    expected = [f() for f in calls]
    with ThreadPoolExecutor(4) as ex:
        futures = [(i, ex.submit(calls[i])) for _ in range(8) for i in range(len(calls))]
        for i, fut in futures:
            assert torch.equal(fut.result(timeout=120), expected[i])


def _child(c, queue):
    # Only our kernel in the child (numpy for the sum): torch's own OpenMP and MKL threads are not
    # fork-safe (libgomp hangs in a child whose parent used them), which is why DataLoader workers run
    # torch with one thread; our kernels no longer use OpenMP's threads.
    queue.put(float(abs(ld.sh_basis(c, 12).numpy()).sum()))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork()")
def test_forked_child_after_the_pool_ran():
    """A DataLoader-style fork after the parent used the pool: the child has none of its threads and
    must start its own instead of waiting for them forever."""
    c = random_coords(500, seed=4)
    expected = float(abs(ld.sh_basis(c, 12).numpy()).sum())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(c, queue))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung in a kernel call")
    assert proc.exitcode == 0
    assert queue.get(timeout=10) == pytest.approx(expected, rel=1e-12)

