"""LocDiff: save_pretrained / from_pretrained round trip."""

import torch

import locdiff_ext as ld

from helpers import region_dataset


def test_save_load_roundtrip_predicts_identically(trained, tmp_path):
    model, final = trained
    loaded = ld.LocDiff.from_pretrained(final)
    emb = region_dataset(8, seed=7)[0].embeddings
    a = model.predict(emb, top_k=2)
    b = loaded.predict(emb, top_k=2)
    torch.testing.assert_close(a[0], b[0], equal_nan=True)
    torch.testing.assert_close(a[1], b[1], equal_nan=True)
    loaded.save_pretrained(tmp_path / "again")
    c = ld.geolocate(emb, model=str(tmp_path / "again"), top_k=2)
    assert [r.lat for r in c] == a[0][:, 0, 0].tolist()
