"""The resumable embedding cache: shards, failures, kill and resume."""

import pytest
import torch

from locdiff_ext.data import read_image_csv
from locdiff_ext.encoders import HFCLIPEncoder, embed_images, failures, load_embeddings

transformers = pytest.importorskip("transformers", reason="the CLIP path needs transformers (in the test extras)")


def test_embedding_cache_resumes_and_skips_bad_images(tiny_clip, image_set, tmp_path):
    enc = HFCLIPEncoder(str(tiny_clip))
    refs, _, _ = read_image_csv(image_set / "mp16.csv", image_set / "imgs")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    refs = refs[:20] + [str(tmp_path / "broken.jpg")] + refs[20:]
    out = embed_images(enc, refs, tmp_path / "cache", batch_size=8, shard_size=16, progress=False, workers=2)
    full, valid = load_embeddings(out)
    assert full.shape == (41, 24) and int(valid.sum()) == 40 and not valid[20]
    assert list(failures(out)) == [str(tmp_path / "broken.jpg")]
    # kill-and-resume: delete the last shard and run again; only it is recomputed, identically
    (out / "shard_00002.safetensors").unlink()
    mtime = (out / "shard_00000.safetensors").stat().st_mtime_ns
    embed_images(enc, refs, out, batch_size=8, shard_size=16, progress=False)
    again, _ = load_embeddings(out)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == mtime
    torch.testing.assert_close(again, full, equal_nan=True)
    with pytest.raises(ValueError, match="other images"):
        embed_images(enc, refs[:5], out, progress=False)
    (out / "shard_00001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(out)
