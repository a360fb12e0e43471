"""The CPU kernels' parallel regions: results independent of the thread count and of calls from several
Python threads at once (errors raised inside a region: tests/kernels/test_limits.py)."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels._loader import _C

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


# ----------------------------------------------------------------------------- threads under a load


def test_thread_rule_leaves_the_cores_other_processes_hold():
    """region_threads()'s rule (csrc/threads.h): the team on an idle machine (never more threads than
    cores), fewer when other processes' runnable threads take cores, at least one."""
    rule = _C.threads_for_load
    assert rule(team=2, cpus=2, online=2, runnable=1, own_runnable=1) == 2
    assert rule(team=2, cpus=2, online=2, runnable=2, own_runnable=2) == 2  # our own spinning worker
    assert rule(team=2, cpus=2, online=2, runnable=3, own_runnable=1) == 1
    assert rule(team=2, cpus=2, online=2, runnable=6, own_runnable=2) == 1
    assert rule(team=16, cpus=16, online=16, runnable=9, own_runnable=1) == 8
    assert rule(team=8, cpus=16, online=16, runnable=1, own_runnable=1) == 8
    assert rule(team=8, cpus=4, online=4, runnable=1, own_runnable=1) == 4
    # 4 of a 64-core host's cores: 32 foreign threads spread over the host take 2 of ours
    assert rule(team=4, cpus=4, online=64, runnable=33, own_runnable=1) == 2
    assert rule(team=4, cpus=4, online=4, runnable=0, own_runnable=0) == 4  # unreadable counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load is read from /proc (Linux)")
def test_kernels_use_fewer_threads_while_other_processes_hold_the_cores():
    cpus = len(os.sched_getaffinity(0))
    if _C.num_threads() < 2 or cpus != os.cpu_count():
        pytest.skip(reason="needs >= 2 kernel threads and all of the machine's cores (the load is machine-wide)")
    expected_idle = min(_C.num_threads(), cpus)

    def settled(target, seconds):  # samples are >= 5 ms apart and a change shows within three
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if _C.region_threads() == target:
                return True
            time.sleep(0.006)
        return False

    # one busy-looping interpreter per core (plain subprocesses: no fork of torch's threads, no torch import)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        assert settled(1, 20.0), "the kernels kept their threads while every core was busy"
        calls = _calls()
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = [f() for f in calls]
        finally:
            torch.set_num_threads(before)
        assert all(torch.equal(a, f()) for a, f in zip(one, calls))  # results unchanged under the load
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)
    assert settled(expected_idle, 10.0), "the kernels did not take their threads back once the load ended"
