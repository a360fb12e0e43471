"""Training: learning a conditional task, exact resume after a kill, DDP equivalence, checkpoints."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.data.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, read_checkpoint
from locdiff_ext.kernels.geometry import great_circle_km
from locdiff_ext.train import Trainer, TrainConfig, lr_factor

from helpers import REGION_CENTRES, ddp_train_worker, region_dataset, tiny_model


def test_conditional_model_learns_eight_regions(tmp_path):
    """8 classes -> 8 regions: >= 90% of held-out predictions within 750 km of their region, and
    the logged training loss decreases (smoothed)."""
    train, _ = region_dataset(4000, seed=1)
    val, val_cls = region_dataset(200, seed=2)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=16, L=10, widths=(128, 64), time_dim=64, dropout=0.0,
                                        sample_steps=20, num_samples=8))
    cfg = TrainConfig(steps=600, batch_size=128, lr=2e-3, warmup_steps=50, eval_every=300, eval_size=64,
                      eval_samples=4, eval_steps=10, checkpoint_every=0, log_every=50)
    trainer = Trainer(model, train, tmp_path, cfg, val_data=val, progress=False)
    history = trainer.fit()
    coords, scores, _ = trainer.ema.predict(val.embeddings)
    d = great_circle_km(coords[:, 0], REGION_CENTRES[val_cls])
    assert (d < 750).double().mean().item() >= 0.9, d
    assert scores.min() > 0.5 and scores.max() <= 1 + 1e-9, (scores.min(), scores.max())  # P(within one lobe)
    losses = torch.tensor([h["loss"] for h in history if "loss" in h])
    smooth = torch.stack([losses[max(0, i - 2):i + 1].mean() for i in range(len(losses))])
    assert (smooth[1:] <= smooth[:-1] * 1.02).all(), losses
    assert losses[-1] < 0.2 * losses[0]
    evals = [h for h in history if "val_acc_750km" in h]
    assert [h["step"] for h in evals] == [300, 600] and evals[-1]["val_acc_750km"] >= 90
    # out_dir holds the last checkpoint, the final EMA model and the history
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000600"]
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "history.json").is_file()


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.01) and lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(1.0) and lr_factor(1000, cfg) == pytest.approx(0.1)
    assert lr_factor(550, cfg) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"stepz": 3})


_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from helpers import region_dataset, tiny_model
    from locdiff_ext.train import Trainer, TrainConfig
    data, _ = region_dataset(512, seed=3)
    cfg = TrainConfig(steps={steps}, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=0,
                      checkpoint_every=100, keep_last=2, log_every=50)
    Trainer(tiny_model(), data, {out!r}, cfg, progress=False).fit()
    """
)


def test_resume_after_kill_is_exact(tmp_path):
    """2000 steps straight == a run killed (SIGKILL) after its step-1000 checkpoint, then resumed."""
    steps = 2000
    data, _ = region_dataset(512, seed=3)
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, warmup_steps=20, eval_every=0, checkpoint_every=100,
                      keep_last=2, log_every=50)
    straight = Trainer(tiny_model(), data, tmp_path / "straight", cfg, progress=False)
    straight.fit()

    out = tmp_path / "killed"
    script = _RESUME_SCRIPT.format(tests=os.path.dirname(__file__), steps=steps, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)  # not the repo root: see _cli
    deadline = time.time() + 300
    try:
        while not (out / "step_00001000").exists():
            assert proc.poll() is None, "the training subprocess ended before its step-1000 checkpoint"
            assert time.time() < deadline, "no step-1000 checkpoint after 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = latest_checkpoint(out)
    assert resumed_from is not None and 1000 <= int(resumed_from.name[5:]) < steps
    assert not (out / "final").exists()

    resumed = Trainer(tiny_model(), data, out, cfg, progress=False)
    resumed.fit()
    for a, b in [(straight.model, resumed.model), (straight.ema, resumed.ema)]:
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    assert [h for h in straight.history if h["step"] > 1000 and "loss" in h][-1]["loss"] == \
        [h for h in resumed.history if "loss" in h][-1]["loss"]


def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    """A 2-process gloo DDP run equals the 1-process run (same global batches) up to float
    summation order, and only rank 0 writes checkpoints."""
    import socket

    import torch.multiprocessing as mp

    monkeypatch.chdir(tmp_path)  # spawned workers import from the cwd: not the repo root's source folder
    steps = 30
    data, _ = region_dataset(512, seed=4)
    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=5, eval_every=0, checkpoint_every=10)
    single = Trainer(tiny_model(), data, tmp_path / "single", cfg, progress=False)
    single.fit()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(ddp_train_worker, args=(2, port, str(tmp_path), steps), nprocs=2, join=True, start_method="spawn")
    ddp_weights = read_checkpoint(tmp_path / "rank0" / f"step_{steps:08d}")[0]["train_model"]
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp_weights[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert [p.name for p in list_checkpoints(tmp_path / "rank0")] == ["step_00000010", "step_00000020", "step_00000030"]
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").iterdir())


def test_trainer_rejects_bad_data(tmp_path):
    data, _ = region_dataset(64, seed=0)
    with pytest.raises(ValueError, match="cond_dim"):
        Trainer(tiny_model(cond_dim=8), data, tmp_path, TrainConfig(steps=1, batch_size=8, eval_every=0))
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_model(), data, tmp_path, TrainConfig(steps=1, batch_size=128, eval_every=0))


def test_resume_refuses_another_config_and_a_tampered_checkpoint(tmp_path):
    data, _ = region_dataset(128, seed=0)
    cfg = TrainConfig(steps=4, batch_size=16, eval_every=0, checkpoint_every=2)
    Trainer(tiny_model(), data, tmp_path, cfg, progress=False).fit()
    with pytest.raises(CheckpointError, match="another model config"):
        Trainer(tiny_model(L=5), data, tmp_path, cfg, progress=False).fit()
    ckpt = latest_checkpoint(tmp_path)
    blob = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (ckpt / "optimizer.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="modified"):
        read_checkpoint(ckpt)


def _weights(model):
    return {k: v.clone() for k, v in model.net.state_dict().items()}


def test_a_fresh_run_never_mixes_with_or_is_replaced_by_an_old_one(tmp_path):
    """Issue 9, defect 2: a --no-resume run into a directory holding a longer finished run kept the old,
    higher-numbered checkpoints and deleted its own; the next resume then 'resumed' the old run and
    out/final was the OLD model."""
    data, _ = region_dataset(256, seed=0)
    old_cfg = TrainConfig(steps=40, batch_size=16, eval_every=0, checkpoint_every=10, keep_last=3, seed=1)
    Trainer(tiny_model(), data, tmp_path, old_cfg, progress=False).fit()
    new_cfg = TrainConfig(steps=20, batch_size=16, eval_every=0, checkpoint_every=10, keep_last=3, seed=2)
    with pytest.raises(ValueError, match="holds a training run .*overwrite=True"):
        Trainer(tiny_model(seed=5), data, tmp_path, new_cfg, progress=False).fit(resume=False)
    with pytest.raises(CheckpointError, match="seed 1 -> 2; steps 40 -> 20|steps 40 -> 20; seed 1 -> 2"):
        Trainer(tiny_model(seed=5), data, tmp_path, new_cfg, progress=False).fit()  # resume: settings differ
    fresh = Trainer(tiny_model(seed=5), data, tmp_path, new_cfg, progress=False)
    fresh.fit(resume=False, overwrite=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    final = ld.LocDiff.from_pretrained(tmp_path / "final")
    for k, v in fresh.ema.net.state_dict().items():
        torch.testing.assert_close(final.net.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # resuming the finished new run is a no-op that keeps it
    again = Trainer(tiny_model(seed=5), data, tmp_path, new_cfg, progress=False)
    again.fit()
    assert again.step == 20
    for k, v in _weights(ld.LocDiff.from_pretrained(tmp_path / "final")).items():
        torch.testing.assert_close(v, fresh.ema.net.state_dict()[k], rtol=0, atol=0, msg=k)


def test_resume_checks_training_settings_and_data_but_not_bookkeeping(tmp_path):
    data, _ = region_dataset(256, seed=0)
    cfg = TrainConfig(steps=10, batch_size=16, eval_every=0, checkpoint_every=5, lr=1e-3)
    Trainer(tiny_model(), data, tmp_path, cfg, progress=False).fit()
    for change, match in [({"lr": 2e-3}, "lr 0.001 -> 0.002"), ({"batch_size": 32}, "batch_size 16 -> 32"),
                          ({"steps": 12}, "steps 10 -> 12")]:
        with pytest.raises(CheckpointError, match=match):
            Trainer(tiny_model(), data, tmp_path, TrainConfig(**{**cfg.__dict__, **change}), progress=False).fit()
    other, _ = region_dataset(256, seed=1)
    with pytest.raises(CheckpointError, match="training data .*same size but other values"):
        Trainer(tiny_model(), other, tmp_path, cfg, progress=False).fit()
    # evaluation, logging and checkpoint cadence may change on resume
    t = Trainer(tiny_model(), data, tmp_path, TrainConfig(**{**cfg.__dict__, "log_every": 3, "keep_last": 1}),
                progress=False)
    t.fit()
    assert t.step == 10


def test_unfinished_checkpoint_writes_are_cleaned_and_a_file_is_no_out_dir(tmp_path):
    data, _ = region_dataset(128, seed=0)
    cfg = TrainConfig(steps=4, batch_size=16, eval_every=0, checkpoint_every=2)
    stale = tmp_path / "run" / ".step_00000004.tmp-k1ll3d"  # what a kill during write_checkpoint leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "run" / "notes.txt").write_text("the user's own file")
    Trainer(tiny_model(), data, tmp_path / "run", cfg, progress=False).fit()
    assert not stale.exists() and (tmp_path / "run" / "notes.txt").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out_dir .*file.* is a file"):
        Trainer(tiny_model(), data, tmp_path / "file", cfg, progress=False)


def test_train_config_checks_every_field():
    for change, err, match in [({"lr": float("nan")}, ValueError, "lr must be finite"),
                               ({"weight_decay": float("inf")}, ValueError, "weight_decay"),
                               ({"min_lr_ratio": 2.0}, ValueError, "min_lr_ratio"),
                               ({"val_fraction": 1.0}, ValueError, "val_fraction"),
                               ({"seed": 2**70}, ValueError, "seed"), ({"steps": 0}, ValueError, "steps"),
                               ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
                               ({"amp": "yes"}, TypeError, "amp must be a bool")]:
        with pytest.raises(err, match="TrainConfig: " + match):
            TrainConfig(**change)
    with pytest.raises(TypeError, match="JSON object"):
        TrainConfig.from_dict([1, 2])
    for field in ("eta", "w0", "kl_temperature", "guidance_scale"):  # NaN surfaced later as "coeffs contains NaN"
        with pytest.raises(ValueError, match=f"LocDiffConfig: {field} must be finite"):
            ld.LocDiffConfig(cond_dim=4, **{field: float("nan")})


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_checkpoints(tmp_path):
    """Too large a learning rate: the run stops with TrainingDiverged (the step, the loss, what to try), before
    a non-finite update reaches the weights; the checkpoints written before stay as they were and no final/
    model (nor any non-finite checkpoint) is written."""
    import hashlib

    from locdiff_ext.data.checkpoint import list_checkpoints
    from locdiff_ext.train import TrainingDiverged

    data, _ = region_dataset(256, seed=1)
    cfg = TrainConfig(steps=80, batch_size=32, lr=100.0, warmup_steps=10, eval_every=0, checkpoint_every=2)
    trainer = Trainer(tiny_model(), data, tmp_path, cfg, progress=False)
    snapshot = {}
    save = trainer.save_checkpoint

    def save_and_hash():  # the bytes of every checkpoint as written
        path = save()
        snapshot[path.name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}
        return path

    trainer.save_checkpoint = save_and_hash
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: the loss is .*lower lr \(e\.g\. 10\)") as e:
        trainer.fit()
    step = e.value.step
    assert 2 <= step < 80 and f"step_{(step // 2) * 2:08d}" in str(e.value)
    assert not (tmp_path / "final").exists()
    kept = list_checkpoints(tmp_path)
    assert kept and all(int(p.name.split("_")[1]) <= step for p in kept)
    for p in kept:  # untouched, and loadable (finite)
        assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in p.iterdir()} == snapshot[p.name]
        ld.LocDiff.from_pretrained(p)
    for name, w in trainer.model.net.state_dict().items():  # the failed step updated nothing
        assert torch.isfinite(w).all(), name


def test_non_finite_gradients_stop_the_run(tmp_path, monkeypatch):
    from locdiff_ext.train import TrainingDiverged

    data, _ = region_dataset(128, seed=2)
    trainer = Trainer(tiny_model(), data, tmp_path, TrainConfig(steps=5, batch_size=16, eval_every=0,
                                                                 checkpoint_every=0, grad_clip=0.0), progress=False)
    first = next(trainer.model.net.parameters())
    first.register_hook(lambda g: g * float("inf"))
    with pytest.raises(TrainingDiverged, match="diverged at step 0: the loss is .* but its gradient norm is"):
        trainer.fit()
    assert torch.isfinite(first).all()


def test_checkpoints_refuse_non_finite_tensors(tmp_path):
    from locdiff_ext.data.checkpoint import CheckpointError, write_checkpoint

    with pytest.raises(CheckpointError, match="'w' contains NaN or infinite"):
        write_checkpoint(tmp_path / "c", {"model": {"w": torch.tensor([1.0, float("nan")])}}, {})
    assert not (tmp_path / "c").exists()
