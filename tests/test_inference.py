"""geolocate(): modes, scores and maps, reproducibility, defaults and bad inputs."""

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.geometry import great_circle_km

from helpers import REGION_CENTRES, region_dataset, tiny_model


def test_geolocate_returns_modes_scores_and_maps(trained):
    model, _ = trained
    val, cls = region_dataset(40, seed=6)
    res = ld.geolocate(val.embeddings, model=model, top_k=3, return_map=True, map_size=(45, 90))
    assert len(res) == 40 and isinstance(res[0], ld.Geolocation)
    hits = [great_circle_km(torch.tensor([r.lat, r.lon]), REGION_CENTRES[c]).item() < 750 for r, c in zip(res, cls)]
    assert np.mean(hits) >= 0.9
    for r in res:
        assert 1 <= len(r.modes) <= 3 and r.modes[0] == (r.lat, r.lon, r.score)
        assert all(a[2] >= b[2] for a, b in zip(r.modes, r.modes[1:]))  # best first
        assert r.prob_map.shape == (45, 90) and abs(r.prob_map.sum() - 1) < 1e-9 and r.prob_map.min() >= 0
    # the map's most probable cell lies near the top mode
    lat, lon = ld.grid_latlon(45, 90)
    j, k = np.unravel_index(np.argmax(res[0].prob_map), (45, 90))
    assert great_circle_km(torch.tensor([lat[j], lon[k]]), torch.tensor([res[0].lat, res[0].lon])).item() < 800
    # same seed -> same answer; 'mode' aggregation agrees with 'mean' on this easy task
    again = ld.geolocate(val.embeddings, model=model, top_k=3, return_map=True, map_size=(45, 90))
    assert [r.modes for r in again] == [r.modes for r in res]
    subset = ld.geolocate(val.embeddings[:5], model=model)  # same noise per row; BLAS rounding differs by batch size
    for a, b in zip(subset, res):
        assert great_circle_km(torch.tensor([a.lat, a.lon]), torch.tensor([b.lat, b.lon])).item() < 25  # << lobe (2200 km)
    by_mode = ld.geolocate(val.embeddings[:10], model=model, aggregate="mode")
    for a, b in zip(by_mode, res[:10]):
        assert great_circle_km(torch.tensor([a.lat, a.lon]), torch.tensor([b.lat, b.lon])).item() < 750


def test_bad_inputs_raise_clear_errors(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="width 5"):
        ld.geolocate(torch.randn(3, 5), model=model)
    bad = torch.randn(3, 16)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ld.geolocate(bad, model=model)
    with pytest.raises(ValueError, match="empty"):
        ld.geolocate([], model=model)
    with pytest.raises(ValueError, match="empty"):
        ld.geolocate(torch.zeros(0, 16), model=model)
    with pytest.raises(TypeError, match="float"):
        ld.geolocate(torch.zeros(3, 16, dtype=torch.int64), model=model)
    with pytest.raises(ValueError, match="no image encoder"):
        ld.geolocate(torch.rand(2, 3, 32, 32), model=model)
    with pytest.raises(ValueError, match="top_k"):
        ld.geolocate(torch.randn(2, 16), model=model, top_k=0)
    with pytest.raises(ValueError, match="num_samples"):
        ld.geolocate(torch.randn(2, 16), model=model, num_samples=0)
    with pytest.raises(ValueError, match="guidance"):
        tiny_model(cond_drop_prob=0.0).predict(torch.randn(2, 16), guidance_scale=2.0)
    with pytest.raises(ValueError, match="LocDiffConfig: L"):
        ld.LocDiffConfig(cond_dim=4, L=0)


def test_geolocate_without_a_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCDIFF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="locdiff demo"):
        ld.geolocate(torch.randn(1, 16))


def test_top_k_costs_only_the_modes_that_exist(tmp_path):
    """Issue 9, defect 6: L=32, 8 inputs, top_k=1000 used 1.26 GiB more than top_k=1 (a [B, top_k, cells]
    mask for the scores); top_k=10**6 and num_samples=10**9 were allocator RuntimeErrors."""
    prog = """
import resource, torch, locdiff_ext as ld
torch.manual_seed(0)
m = ld.LocDiff(ld.LocDiffConfig(cond_dim=8, L=32, widths=(32, 16), time_dim=16, sample_steps=3, num_samples=16))
e = torch.randn(8, 8)
m.predict(e, top_k=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c, s, _ = m.predict(e, top_k=1000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, int(torch.isfinite(s).sum()))
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra_mib, modes = map(int, proc.stdout.split())
    assert extra_mib < 100 and modes >= 8
    model = tiny_model(L=4)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 200\]"):  # the (2L+2) x (4L+4) decoder grid
        model.predict(torch.randn(2, 16), top_k=10**6)
    with pytest.raises(ValueError, match="num_samples"):
        model.predict(torch.randn(2, 16), num_samples=10**9)
    with pytest.raises(ValueError, match="num_samples/batch_size/map_size: this call would need"):
        model.predict(torch.randn(4096, 16), num_samples=65_536, batch_size=4096)  # ~40 TiB of samples
    c, s, _ = model.predict(torch.randn(2, 16), top_k=200)  # the most there can be: padded, not an error
    assert c.shape == (2, 200, 2) and torch.isinf(s[:, -1]).all()


def test_predict_validates_every_argument():
    """Issue 9, defect 9: steps=0 silently meant the default; seed=2**70 'Overflow when unpacking long
    long'; a NaN guidance_scale surfaced as 'coeffs contains NaN'."""
    model = tiny_model(L=4)
    e = torch.randn(2, 16)
    for kwargs, err, match in [({"steps": 0}, ValueError, "steps must be in"), ({"steps": 10**6}, ValueError, "steps"),
                               ({"seed": 2**70}, ValueError, "seed"), ({"seed": -1}, ValueError, "seed"),
                               ({"seed": 1.5}, TypeError, "seed"), ({"guidance_scale": float("nan")}, ValueError,
                                                                     "guidance_scale must be finite"),
                               ({"map_size": (0, 10)}, ValueError, "map_size"), ({"map_size": 5}, ValueError, "map_size"),
                               ({"batch_size": 0}, ValueError, "batch_size"), ({"aggregate": "median"}, ValueError,
                                                                                "aggregate")]:
        with pytest.raises(err, match=match):
            model.predict(e, **kwargs)


def test_huge_and_tiny_embeddings_keep_their_direction():
    """Issue 9, defect 7: embeddings >= 1e19 overflowed the float32 normalisation into the all-zero
    embedding's answer; 1e-30 ones underflowed."""
    from locdiff_ext.kernels.geometry import unit_rows

    model = tiny_model(L=4)
    e = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    ref = model.condition(e)
    for f in (1e-30, 1e-20, 1e19, 1e30):
        torch.testing.assert_close(model.condition(e * f), ref, rtol=1e-6, atol=1e-7)
    same = [torch.Generator().manual_seed(3) for _ in range(2)]  # predict seeds by input values: fix the noise
    torch.testing.assert_close(model.sample(model.embed(e * 1e30), 4, generator=same[0]),
                               model.sample(model.embed(e), 4, generator=same[1]))
    assert torch.isfinite(model.predict(e * 1e30, seed=3)[0]).all()
    assert torch.equal(unit_rows(torch.zeros(2, 4)), torch.zeros(2, 4))
    x = torch.randn(50, 7)
    assert torch.equal(unit_rows(x), torch.nn.functional.normalize(x, dim=-1))  # bit for bit on ordinary rows
    with pytest.raises(ValueError, match="float32's range"):
        model.predict(torch.full((1, 16), 1e39, dtype=torch.float64))


def test_embeddings_as_lists_and_none():
    """Issue 9, defect 9: a list of lists was reported as 'inputs look like images'; None gave
    "'NoneType' object is not iterable"."""
    model = tiny_model(L=4)
    e = torch.randn(2, 16)
    a = ld.geolocate(e.tolist(), model=model)
    b = ld.geolocate(e, model=model)
    assert [(r.lat, r.lon) for r in a] == [(r.lat, r.lon) for r in b]
    assert len(ld.geolocate([np.asarray(row) for row in e.tolist()], model=model)) == 2
    with pytest.raises(TypeError, match="inputs must be images .* got None"):
        ld.geolocate(None, model=model)
    with pytest.raises(ValueError, match="one width"):
        ld.geolocate([[1.0, 2.0], [3.0]], model=model)


def test_an_input_gets_the_same_answer_in_any_batch(trained):
    """Issue 13, item 2: the same image twice in one call gave answers 60 km apart, and a third alone.  Each
    input's noise now comes from the seed and the input's own values, so batch size and position do not
    matter (what is left is float rounding that depends on the batch shape: metres, not kilometres)."""
    model, _ = trained
    val, _ = region_dataset(12, seed=9)
    x = val.embeddings
    full = model.predict(x, seed=5)[0][:, 0]
    alone = model.predict(x[7:8], seed=5)[0][:, 0]
    mixed = model.predict(torch.cat([x[7:8], x[3:4], x[7:8]]), seed=5, batch_size=2)[0][:, 0]

    def km(a, b):
        return great_circle_km(a, b).max().item()

    assert km(mixed[0:1], alone) < 1 and km(mixed[2:3], alone) < 1 and km(full[7:8], alone) < 1
    assert km(mixed[1:2], full[3:4]) < 1
    other = model.predict(x[7:8], seed=6)[0][:, 0]
    assert not torch.equal(other, alone)  # the seed still matters
