"""The reliability plot: each curve with its band, identical (or all but identical) curves drawn once under both names."""

from PIL import Image

from locdiff_ext.datasets.mapplot import merge_curves, write_reliability_plot


def test_identical_curves_are_drawn_once_and_the_legend_fits(tmp_path):
    levels = [0.1, 0.5, 0.9]
    same = (levels, [0.1, 0.3, 0.5], [(0.05, 0.15)] * 3)
    long = "LocDiff-R, anchored (w=1, hybrid off), conformal, unseen"
    curves = {long: same, "kNN density (k=64), conformal, unseen": same,
              "LocDiff-R, conformal, seen": (levels, [0.2, 0.6, 0.95], [(0.1, 0.3)] * 3)}
    path = write_reliability_plot(tmp_path / "r.png", curves)
    with Image.open(path) as im:
        assert im.size[0] >= 60 + 400 + 6 * len(long + " = kNN density (k=64), conformal, unseen")
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (214, 39, 40) in colours and (31, 119, 180) in colours  # two curves drawn
    assert (255, 127, 14) not in colours  # no third colour: the identical curve was merged


def test_curves_within_half_a_point_are_drawn_once_joined_by_a_tilde():
    levels = [0.1, 0.5, 0.9]
    a = (levels, [0.1, 0.3, 0.5], [(0.05, 0.15)] * 3)
    near = (levels, [0.1, 0.304, 0.5], [(0.05, 0.15)] * 3)  # one item of 250 apart: would hide under a
    apart = (levels, [0.1, 0.31, 0.5], [(0.05, 0.15)] * 3)
    assert list(merge_curves({"x": a, "y": near, "z": apart})) == ["x ~ y", "z"]
    assert list(merge_curves({"x": a, "y": a})) == ["x = y"]
