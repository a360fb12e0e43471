"""Images through a model's image encoder: files, PIL, tensors, tar members; bad files name themselves."""

import math
import tarfile

import numpy as np
import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.encoders import SmallCNNEncoder


def test_images_through_the_models_image_encoder(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=32, L=4, widths=(32, 16), time_dim=16, sample_steps=3, num_samples=2),
                       image_encoder=SmallCNNEncoder(dim=32, image_size=32, channels=(8, 16)))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(rgb)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)).save(gray)
    res = ld.geolocate([rgb, str(gray), Image.open(rgb), torch.rand(3, 32, 32)], model=model, top_k=2)
    assert len(res) == 4 and all(math.isfinite(r.lat) for r in res)
    # the image path and the tensor path give the same embedding for the same pixels
    assert torch.allclose(model.embed([rgb]), model.embed(model.image_encoder.preprocess([rgb])))
    model.save_pretrained(tmp_path / "m")
    loaded = ld.LocDiff.from_pretrained(tmp_path / "m")
    assert loaded.image_encoder is not None and torch.allclose(loaded.embed([rgb]), model.embed([rgb]))

    (tmp_path / "notes.txt").write_text("not an image")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(rgb.read_bytes()[:60])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ld.geolocate([tmp_path / "missing.jpg"], model=model)
    with pytest.raises(ValueError, match="not an image"):
        ld.geolocate([tmp_path / "notes.txt"], model=model)
    with pytest.raises(ValueError, match="corrupt"):
        ld.geolocate([corrupt], model=model)
    with pytest.raises(ValueError, match="too small"):
        ld.geolocate([tiny], model=model)


@pytest.mark.parametrize("bad", ["missing", "text", "corrupt"])
def test_predict_reports_bad_image_files(tmp_path, bad):
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=16, L=4, widths=(16,), time_dim=8),
                       image_encoder=SmallCNNEncoder(dim=16, image_size=16, channels=(8,)))
    path = tmp_path / "x.png"
    if bad == "text":
        path.write_text("hello")
    elif bad == "corrupt":
        from PIL import Image

        Image.new("RGB", (32, 32), (10, 200, 30)).save(path)
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises((FileNotFoundError, ValueError), match="x.png"):
        ld.geolocate([path], model=model)


def test_tar_members_read_concurrently_are_intact(tmp_path):
    """Worker threads share one open archive: reads must not interleave (a CI run once lost an image)."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from locdiff_ext.encoders import load_image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(48)]
    tar_path = tmp_path / "many.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, a in enumerate(arrays):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")  # incompressible noise: ~7 kB per member
            info = tarfile.TarInfo(f"img_{i:03d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    refs = [f"{tar_path}::img_{i:03d}.png" for i in range(len(arrays))] * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(load_image, refs))
    for i, im in enumerate(images):
        assert np.array_equal(np.asarray(im), arrays[i % len(arrays)])


def test_images_of_every_usual_form_and_clear_refusals(tmp_path):
    """Issue 13 item 7: numpy H x W x 3 images (as PIL and OpenCV hold them) were rejected; issue 9,
    defect 9: a directory was 'does not exist'; complex and bool image tensors were accepted."""
    from PIL import Image

    torch.manual_seed(0)
    model = ld.LocDiff(ld.LocDiffConfig(cond_dim=16, L=4, widths=(16,), time_dim=8, sample_steps=2, num_samples=2),
                       image_encoder=SmallCNNEncoder(dim=16, image_size=16, channels=(8,)))
    px = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)  # the encoder size: no resampling
    Image.fromarray(px).save(tmp_path / "a.png")
    ref = model.embed([tmp_path / "a.png"])
    torch.testing.assert_close(model.embed(px), ref)                    # one H x W x 3 array
    torch.testing.assert_close(model.embed(px[None].repeat(2, 0)), ref.expand(2, -1))  # N x H x W x 3
    torch.testing.assert_close(model.embed([px, Image.open(tmp_path / "a.png")]), ref.expand(2, -1))
    rgba = np.concatenate([px, np.full((16, 16, 1), 255, np.uint8)], -1)
    torch.testing.assert_close(model.embed([rgba]), ref)                # alpha dropped
    with pytest.raises(ValueError, match="is a directory"):
        ld.geolocate([tmp_path], model=model)
    for bad in (torch.rand(3, 16, 16) > 0.5, torch.rand(3, 16, 16, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="uint8 .* or float"):
            ld.geolocate([bad], model=model)
