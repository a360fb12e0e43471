"""Shared test helpers (imported as `helpers`: tests/ is on pytest's pythonpath)."""

import torch

import locdiff_ext

CUDA_OK = torch.cuda.is_available() and locdiff_ext.has_cuda()
CUDA_REASON = (
    "needs a CUDA GPU and a CUDA build of torch"
    if not torch.cuda.is_available()
    else "locdiff_ext was built without CUDA kernels"
)


def random_coords(n, dtype=torch.float64, seed=0, extras=True):
    """Uniform points on the sphere plus both poles and the antimeridian."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    lat = torch.rad2deg(torch.asin(z))
    lon = torch.rand(n, generator=g, dtype=torch.float64) * 360 - 180
    pts = torch.stack([lat, lon], 1)
    if extras:
        special = torch.tensor(
            [[90.0, 0.0], [-90.0, 0.0], [90.0, 123.0], [0.0, -180.0], [0.0, 180.0], [45.0, 179.999999], [-30.0, -180.0]],
            dtype=torch.float64,
        )
        pts = torch.cat([pts, special])
    return pts.to(dtype)


REGION_CENTRES = torch.tensor(
    [[48.0, 2.0], [-23.0, -46.0], [35.0, 139.0], [40.0, -100.0], [-25.0, 135.0], [0.0, 20.0], [55.0, 80.0], [-40.0, -70.0]],
    dtype=torch.float64,
)


def region_dataset(n, seed, dim=16, spread_deg=2.0, noise=0.3):
    """8 classes -> 8 regions: each row's embedding is its class prototype (fixed random vectors)
    plus noise, its location the class's region centre plus Gaussian scatter.  Returns
    (EmbeddingDataset, class index [n])."""
    from locdiff_ext.data import EmbeddingDataset

    protos = torch.randn(8, dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 8, (n,), generator=g)
    emb = protos[cls] + noise * torch.randn(n, dim, generator=g)
    pts = REGION_CENTRES[cls] + torch.randn(n, 2, generator=g, dtype=torch.float64) * spread_deg
    pts[:, 0] = pts[:, 0].clamp(-89.0, 89.0)
    return EmbeddingDataset(emb, pts), cls


def tiny_model(cond_dim=16, L=4, seed=0, **kw):
    """A LocDiff small enough to train thousands of steps in seconds on a CPU (initialised from
    ``seed``, so that two processes build the same model)."""
    import locdiff_ext as ld

    torch.manual_seed(seed)
    cfg = dict(cond_dim=cond_dim, L=L, widths=(32, 16), time_dim=16, dropout=0.0, sample_steps=5, num_samples=4)
    cfg.update(kw)
    return ld.LocDiff(ld.LocDiffConfig(**cfg))


def ddp_train_worker(rank, world, port, out_root, steps, store=None):
    """One process of the 2-process DDP tests (a module-level function here, so that spawned
    workers can import it by name: helpers is on their sys.path, the tests package is not).  With
    ``store`` (a store directory): a retrieval model trained over it, and the rows this rank read at
    each step written to ``rows{rank}.json``."""
    import json
    import os

    import torch.distributed as dist

    from locdiff_ext.train import Trainer, TrainConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if store is None:
        data, _ = region_dataset(512, seed=4)
        cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=5, eval_every=0, checkpoint_every=10)
        Trainer(tiny_model(), data, os.path.join(out_root, f"rank{rank}"), cfg, progress=False).fit()
    else:
        from locdiff_ext.data.store import EmbeddingStore

        cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=5, eval_every=0, checkpoint_every=10)
        trainer = Trainer(tiny_model(retrieval_k=2), EmbeddingStore(store), os.path.join(out_root, f"rank{rank}"),
                          cfg, progress=False)
        reads, batch = [], trainer.batch

        def recorded(rows):
            reads.append(rows.tolist())
            return batch(rows)

        trainer.batch = recorded
        trainer.fit()
        with open(os.path.join(out_root, f"rows{rank}.json"), "w") as f:
            json.dump(reads, f)
    dist.destroy_process_group()


def run_cli(*args, cwd, env=None, check=True, timeout=900):
    """``python -m locdiff_ext ARGS`` in a subprocess (the `locdiff` console script's entry point) run in
    ``cwd``, which must not be the repository root (its source folder would shadow the installed
    package); ``env`` entries are added to the environment.  With ``check``, a non-zero exit fails
    the test with the command's output."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "locdiff_ext", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})), cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"locdiff {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
