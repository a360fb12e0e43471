"""The CPU kernels' parallel regions: results independent of the thread count and of calls from several
Python threads at once (errors raised inside a region: tests/kernels/test_limits.py)."""

from concurrent.futures import ThreadPoolExecutor

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
    """The kernels release the GIL, so these calls overlap."""
    calls = _calls()
    expected = [f() for f in calls]
    with ThreadPoolExecutor(4) as ex:
        futures = [(i, ex.submit(calls[i])) for _ in range(8) for i in range(len(calls))]
        for i, fut in futures:
            assert torch.equal(fut.result(timeout=120), expected[i])

