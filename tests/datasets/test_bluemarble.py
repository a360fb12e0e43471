"""The Blue Marble dataset builder: crops centred on their labels, splits that do not leak."""

import numpy as np

from locdiff_ext.datasets import bluemarble as bm


def test_crops_are_centred_on_their_labels_and_splits_do_not_leak():
    centres = bm.sample_land_centres(3000, seed=1)
    assert bm.is_land(centres[:, 0], centres[:, 1]).all() and np.abs(centres[:, 0]).max() <= 75
    crops = bm.extract_crops(centres[:5], crop_px=64, out_px=64)
    img = bm.load_blue_marble()
    for c, crop in zip(centres[:5], crops):  # the crop's centre pixels are the image at the label
        r = int(round((90 - c[0]) / 180 * bm.IMAGE_HEIGHT))
        k = int(round((c[1] + 180) / 360 * bm.IMAGE_WIDTH)) % bm.IMAGE_WIDTH
        assert np.array_equal(crop[32, 32], img[r, k])
    # across the antimeridian: 179.4 E and 179.6 W are 1 degree = 15 px apart
    wrap = bm.extract_crops(np.array([[10.0, 179.4], [10.0, -179.6]]), 64, 64)
    assert np.array_equal(wrap[0][:, 15:], wrap[1][:, :-15])
    s = bm.split_by_region(centres, crop_px=64)
    names = ["train", "val_region", "val_random", "test_region", "test_random"]
    assert sorted(s) == sorted(names) and all(len(s[n]) > 0 for n in names)
    for i, a in enumerate(names):  # five disjoint sets
        for b in names[i + 1:]:
            assert set(s[a]).isdisjoint(s[b]), (a, b)
    assert len(np.concatenate([s[n] for n in names])) <= len(centres)
    test_tiles, val_tiles = bm.held_out_tiles(10.0, 5, 0), bm.held_out_tiles(10.0, 5, 0, validation=True)
    assert set(test_tiles).isdisjoint(val_tiles) and len(val_tiles) == len(test_tiles) // 4
    held = np.concatenate([test_tiles, val_tiles])
    half = 32 * bm.DEG_PER_PX
    for dlat in (-half, 0, half):  # no pixel of a held-out tile in any training crop
        for dlon in (-half, 0, half):
            tiles = bm.tile_ids(centres[s["train"], 0] + dlat, centres[s["train"], 1] + dlon, 10.0)
            assert not np.isin(tiles, held).any()
    assert np.isin(bm.tile_ids(centres[s["test_region"], 0], centres[s["test_region"], 1], 10.0), test_tiles).all()
    assert np.isin(bm.tile_ids(centres[s["val_region"], 0], centres[s["val_region"], 1], 10.0), val_tiles).all()
    for name in ("val_random", "test_random"):  # seen places: in no held-out tile
        assert not np.isin(bm.tile_ids(centres[s[name], 0], centres[s[name], 1], 10.0), held).any()
