"""Progress in logs (issue 13 item 1): with output going to a file or a pipe the demo printed nothing for
17-20 minutes.  Long work now prints a line when it starts, every LOCDIFF_LOG_EVERY seconds (count,
rate, time left) and when it ends; results still go to stdout."""

import io

import torch

from locdiff_ext.progress import Progress
from locdiff_ext.train import Trainer, TrainConfig

from helpers import region_dataset, tiny_model


def test_lines_in_a_log(monkeypatch):
    monkeypatch.setenv("LOCDIFF_LOG_EVERY", "0")
    log = io.StringIO()  # not a terminal
    with Progress(10, "work", "item", file=log) as bar:
        for _ in range(10):
            bar.update(1)
            bar.set_postfix(loss="0.5")
        bar.log("a note")
    lines = log.getvalue().splitlines()
    assert lines[0] == "work: started"
    assert lines[1].startswith("work: 1/10 item (10%), ") and "item/s" in lines[1] and "left " in lines[1]
    assert "a note" in lines and lines[-1].startswith("work: done, 10/10 item in ")
    quiet = io.StringIO()
    with Progress(5, "work", file=quiet, enabled=False) as bar:
        bar.update(5)
        bar.log("not shown")
    assert quiet.getvalue() == ""


def test_training_and_prediction_report_progress_when_not_on_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCDIFF_LOG_EVERY", "0")
    data, _ = region_dataset(200, seed=0)
    cfg = TrainConfig(steps=7, batch_size=32, eval_every=5, eval_size=16, eval_samples=2, eval_steps=2,
                      checkpoint_every=5, warmup_steps=2)
    t = Trainer(tiny_model(), data, tmp_path / "run", cfg)  # progress=True, output captured: not a terminal
    t.fit()
    out, err = capsys.readouterr()
    assert "train: started" in err and "train: 3/7 step (43%)" in err and "step/s" in err
    assert "checkpoint step_00000005: " in err and " MB (" in err and "train: done, 7/7 step" in err
    assert "step 5: val median" in out and "step 7: val median" in out  # the last step is evaluated too
    t.ema.predict(torch.randn(5, 16), batch_size=2, progress=True)
    _, err = capsys.readouterr()
    assert "predict: 2/5 input (40%)" in err and "predict: done, 5/5 input" in err
