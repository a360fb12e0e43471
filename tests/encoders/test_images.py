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


def _marked_pixels():
    """A 24 x 40 RGB image whose corners differ (red top-left, green top-right, blue bottom-left, white
    bottom-right), so that every one of the 8 orientations gives a different pixel grid."""
    a = np.zeros((24, 40, 3), dtype=np.uint8)
    a[:6, :6] = (255, 0, 0)
    a[:6, -6:] = (0, 255, 0)
    a[-6:, :6] = (0, 0, 255)
    a[-6:, -6:] = (255, 255, 255)
    return a


# EXIF orientation -> how the stored grid must be turned to show the picture upright (the EXIF 2.3 table):
# 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90 counter-clockwise
# (each stored grid below is the inverse turn of the upright one).
_STORED_FROM_UPRIGHT = {
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, 1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A file stored turned, with the EXIF tag that says so (phones store portrait shots with tag 6), loads
    upright, from a path and from a PIL image, exactly as Pillow's exif_transpose shows it."""
    from PIL import Image, ImageOps

    from locdiff_ext.encoders import load_image

    upright = _marked_pixels()
    stored = np.ascontiguousarray(_STORED_FROM_UPRIGHT[orientation](upright))
    path = tmp_path / f"o{orientation}.png"  # lossless, so the pixel grids compare exactly
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif)
    for source in [path, Image.open(path)]:
        got = np.asarray(load_image(source))
        assert got.shape == upright.shape and np.array_equal(got, upright), orientation
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(ImageOps.exif_transpose(Image.open(path))))
    # a JPEG (as phones write them) turns the same way
    jpg = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(jpg, exif=exif, quality=95)
    assert np.asarray(load_image(jpg)).shape == upright.shape


def _wide_images():
    """Every Pillow mode wider than 8 bits a PNG or TIFF can hold, with its pixels and their 8-bit values."""
    ramp = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32)
    from PIL import Image

    u16 = np.rint(7 + ramp * (65534 - 7)).astype(np.uint16)
    yield "I;16", Image.fromarray(u16), u16 / 65535.0
    yield "I;16B", Image.frombytes("I;16B", (32, 32), u16.astype(">u2").tobytes()), u16 / 65535.0
    i32_small = u16.astype(np.int32)  # how Pillow opens some 16-bit files: mode I with 16-bit values
    yield "I (16-bit values)", Image.fromarray(i32_small, "I"), i32_small / 65535.0
    i32 = np.rint(ramp * 2147483647).astype(np.int32)
    yield "I (32-bit values)", Image.fromarray(i32, "I"), i32 / 2147483647.0
    f = (ramp * 1.2 - 0.1).astype(np.float32)  # a float image overshooting 0..1 a little: clipped
    yield "F", Image.fromarray(f, "F"), np.clip(f, 0, 1)


# PNG holds 16-bit samples only; TIFF holds 32-bit integer and float samples too
@pytest.mark.parametrize("case,fmt", [(c, f) for c in range(5) for f in ["png", "tiff", "pil"] if not (c >= 2 and f == "png")])
def test_wide_images_are_scaled_not_saturated(tmp_path, case, fmt):
    """16-bit grayscale (values 7..65534) must not load as a white image (Pillow's convert("RGB") clips I;16):
    each sample is scaled by its type's range to 8 bits, through files and PIL images alike."""
    from PIL import Image

    from locdiff_ext.encoders import load_image

    label, img, expected = list(_wide_images())[case]
    if fmt == "pil":
        src = img
    else:
        src = tmp_path / f"wide.{fmt}"
        img.save(src)
    got = np.asarray(load_image(src)).astype(np.float64)
    assert got.shape == (32, 32, 3) and np.array_equal(got[..., 0], got[..., 2])
    assert np.abs(got[..., 0] - expected * 255.0).max() <= 1.0, (label, fmt, Image.open(src).mode if fmt != "pil" else "")
    assert 100 < got.mean() < 155  # a ramp, neither black nor white


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I;16", "I", "F",
                                  "RGBX", "HSV", "LAB"])
def test_every_pillow_mode_loads_as_8_bit_rgb(tmp_path, mode):
    from PIL import Image

    from locdiff_ext.encoders import load_image

    img = Image.new(mode, (16, 12))
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (16, 12)
    for fmt in ["png", "tiff"]:
        path = tmp_path / f"m.{fmt}"
        try:
            img.save(path)
        except (OSError, KeyError, ValueError):
            continue  # a mode this format cannot hold
        assert load_image(path).mode == "RGB"


def test_uint16_arrays_scale_like_16_bit_files():
    from locdiff_ext.encoders import image_to_tensor

    a = np.full((16, 16), 65535 // 2, dtype=np.uint16)
    t = image_to_tensor(a, 16)
    assert torch.allclose(t, torch.full_like(t, (65535 // 2) / 65535.0))
