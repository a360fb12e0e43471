"""Kernels, torch ops and geolocate in children made by os.fork() after the parent ran parallel work: GNU
OpenMP is not fork-safe (a child's next parallel region waits forever for the parent's threads), so the kernels
mark the child at fork and run there on one thread outside any team, and torch gets one thread there."""

import multiprocessing
import os
import pickle
import select
import time

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels._loader import _C

from helpers import random_coords

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


def _every_op(model):
    c = random_coords(500, seed=1)
    x = ld.shdd_encode(c, 16)
    g = c.clone().requires_grad_(True)
    maps = ld.sh_synthesis(x[:32].clone().requires_grad_(True), 34, 68)
    maps.sum().backward()
    ld.sh_basis(g, 16).sum().backward()
    modes, scores = ld.shdd_decode(x[:64], top_k=2)
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(0))
    res = ld.geolocate(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), model=model, top_k=1)
    return {"basis": ld.sh_basis(c, 16), "grad": g.grad, "maps": maps.detach(), "modes": modes, "scores": scores,
            "matmul": a @ a, "geolocate": [(r.lat, r.lon) for r in res], "threads": _C.region_threads()}


def _in_child(fn, timeout_s=60.0):
    """fn() in a forked child; returns its result, or fails when the child does not finish in time."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(r)
        code = 0
        try:
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001  (report anything to the parent)
            payload, code = pickle.dumps(("error", repr(exc))), 1
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout_s
    with os.fdopen(r, "rb") as f:
        while time.monotonic() < deadline:
            if select.select([f], [], [], 0.1)[0]:
                chunk = os.read(f.fileno(), 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"a forked child did not finish within {timeout_s} s (hung in an OpenMP region?)")
    os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    assert status == "ok", value
    return value


def test_forked_children_run_every_op_and_geolocate(trained):
    model, _ = trained
    expected = _every_op(model)  # the parent runs parallel regions (ours and torch's) first
    assert torch.get_num_threads() >= 1
    for trial in range(12):
        got = _in_child(lambda: _every_op(model))
        assert got["threads"] == 1  # the child runs the kernels on its own thread
        for k in ["basis", "grad", "maps", "modes", "scores"]:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, equal_nan=True)  # thread-count free
        torch.testing.assert_close(got["matmul"], expected["matmul"], rtol=1e-5, atol=1e-4)
        flat = lambda pairs: [v for pair in pairs for v in pair]  # noqa: E731
        assert flat(got["geolocate"]) == pytest.approx(flat(expected["geolocate"]), abs=1e-3)
        _every_op(model)  # more parallel work in the parent between forks
    assert _C.region_threads() >= 1 and torch.get_num_threads() >= 1  # the parent keeps its threads


def _basis_sum(seed):
    return float(ld.sh_basis(random_coords(2000, seed=seed), 20).sum())


def test_fork_start_method_pool():
    """multiprocessing with the fork start method, as preprocessing scripts use it."""
    _basis_sum(0)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        res = pool.map_async(_basis_sum, range(8))
        got = res.get(timeout=120)
    assert got == pytest.approx([_basis_sum(s) for s in range(8)], rel=1e-12)
