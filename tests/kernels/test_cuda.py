"""CUDA kernels: the same checks as on the CPU, CPU-vs-CUDA agreement, a non-default stream.
Skipped (with the reason) where no GPU is present."""

import pytest
import torch

import locdiff_ext as ld
from locdiff_ext.kernels.reference import great_circle_km, sh_basis_ref, sh_synthesis_ref

from helpers import CUDA_OK, CUDA_REASON, random_coords

pytestmark = pytest.mark.skipif(not CUDA_OK, reason=CUDA_REASON)


def test_build_reports_cuda():
    assert ld.has_cuda()


@pytest.mark.parametrize("L", [0, 1, 5, 16, 17, 20, 31, 32, 64, 200])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_basis_cuda_matches_cpu_and_reference(L, dtype):
    """float32 up to L = 16 computes in float (csrc/sh_cuda.cu: within 1e-5 of float64), in double above."""
    c = random_coords(300, seed=L).to(dtype)
    gpu = ld.sh_basis(c.cuda(), L)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype
    cpu = ld.sh_basis(c, L)
    ref = sh_basis_ref(c.double(), L)
    if dtype == torch.float64:
        assert ((gpu.cpu() - ref).abs().max() / ref.abs().max()).item() <= 1e-10
    else:
        assert (gpu.cpu().double() - ref).abs().max().item() <= 1e-5
    f32 = dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5 if f32 else 1e-11, atol=1e-5 if f32 and L <= 16 else 1e-6)


def test_basis_cuda_L1000_finite():
    c = random_coords(8, seed=2).float().cuda()
    Y = ld.sh_basis(c, 1000)
    assert torch.isfinite(Y).all()
    torch.testing.assert_close(Y.cpu(), ld.sh_basis(c.cpu(), 1000), rtol=1e-4, atol=1e-5)


def test_shdd_encode_weights_cuda():
    L = 16
    c = random_coords(50, seed=4)
    w = torch.linspace(1.0, 0.2, L + 1, dtype=torch.float64)
    torch.testing.assert_close(ld.shdd_encode(c.cuda(), L, w.cuda()).cpu(), ld.shdd_encode(c, L, w))
    with pytest.raises(ValueError, match="weights"):
        ld.shdd_encode(c.cuda(), L, w)


@pytest.mark.parametrize("L", [40, 64, 128])  # teams of 64, 96, 160 threads: the reduction's odd sizes
def test_backward_cuda_matches_cpu(L):
    c = random_coords(64, seed=6)
    g = torch.randn(c.shape[0], (L + 1) ** 2, dtype=torch.float64)
    w = torch.linspace(1.0, 0.5, L + 1, dtype=torch.float64)
    grads = []
    for dev in ["cpu", "cuda"]:
        x = c.to(dev).requires_grad_(True)
        (ld.shdd_encode(x, L, w.to(dev)) * g.to(dev)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)
    x = c[:8].clamp(-85, 85).cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ld.sh_basis(t, 8), (x,))


@pytest.mark.parametrize("L,nlat,nlon", [(0, 3, 5), (8, 10, 20), (32, 66, 132), (33, 34, 68), (64, 130, 260)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_synthesis_cuda(L, nlat, nlon, dtype):
    """float32 up to L = 32 computes in float (within 1e-5 of the map's largest value), in double above."""
    c = torch.randn(4, (L + 1) ** 2, dtype=torch.float64).to(dtype)
    out = ld.sh_synthesis(c.cuda(), nlat, nlon)
    ref = sh_synthesis_ref(c.double(), nlat, nlon)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (out.cpu().double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("L", [8, 16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_cuda_roundtrip_and_agreement(L, dtype):
    pts = random_coords(256, seed=L)
    x = ld.shdd_encode(pts.to(dtype), L)
    gpu_c, gpu_s = ld.shdd_decode(x.cuda(), top_k=1)
    cpu_c, cpu_s = ld.shdd_decode(x, top_k=1)
    tol_km = 1.0 if dtype == torch.float32 else 1e-3
    assert great_circle_km(gpu_c[:, 0].cpu(), pts).max().item() < tol_km
    assert great_circle_km(gpu_c[:, 0].cpu(), cpu_c[:, 0]).max().item() < tol_km
    torch.testing.assert_close(gpu_s.cpu(), cpu_s, rtol=1e-5, atol=1e-5)


def test_decode_cuda_two_modes_and_padding():
    L = 32
    a = torch.tensor([[35.68, 139.69]], dtype=torch.float64)
    b = torch.tensor([[-33.87, 151.21]], dtype=torch.float64)
    c = (0.6 * ld.shdd_encode(a, L) + 0.4 * ld.shdd_encode(b, L)).cuda()
    coords, scores = ld.shdd_decode(c, top_k=2)
    assert great_circle_km(coords[0, 0].cpu(), a[0]).item() < 25.0
    assert great_circle_km(coords[0, 1].cpu(), b[0]).item() < 25.0
    one = ld.shdd_encode(a, 4).cuda()
    coords, scores = ld.shdd_decode(one, top_k=8, min_separation_km=21000.0)
    assert torch.isfinite(coords[0, 0]).all() and torch.isnan(coords[0, 1:]).all()
    with pytest.raises(ValueError, match="candidates"):
        ld.shdd_decode(one, top_k=16)


def test_non_default_stream():
    L = 24
    c = random_coords(1000, seed=12).cuda()
    expected = ld.sh_basis(c, L)
    exp_modes, _ = ld.shdd_decode(expected[:64])
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = ld.sh_basis(c, L)
        modes, _ = ld.shdd_decode(got[:64])
        maps = ld.sh_synthesis(got[:4], 16, 32)
    s.synchronize()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(modes, exp_modes)
    torch.testing.assert_close(maps, ld.sh_synthesis(expected[:4], 16, 32))


def test_opcheck_cuda():
    c = random_coords(5, seed=0).clamp(-89.0, 89.0).cuda()
    coeffs = ld.shdd_encode(c, 6)
    torch.library.opcheck(torch.ops.locdiff.sh_basis.default, (c.clone().requires_grad_(True), 6))
    torch.library.opcheck(torch.ops.locdiff.sh_synthesis.default, (coeffs, 5, 12))
    torch.library.opcheck(torch.ops.locdiff.shdd_decode.default, (coeffs, 2, 0, 0, 0, 30, 0.0))


def test_pipeline_trains_and_predicts_on_cuda(tmp_path):
    """The trainer (bf16 autocast) and geolocate run on the GPU and agree with the CPU model."""
    from locdiff_ext.train import Trainer, TrainConfig

    from helpers import region_dataset, tiny_model

    data, _ = region_dataset(512, seed=3)
    cfg = TrainConfig(steps=50, batch_size=64, eval_every=0, checkpoint_every=0)
    trainer = Trainer(tiny_model(), data, tmp_path, cfg, progress=False)
    assert trainer.device.type == "cuda" and trainer.amp_dtype == torch.bfloat16
    trainer.fit()
    gpu = ld.LocDiff.from_pretrained(tmp_path / "final", map_location="cuda")
    cpu = ld.LocDiff.from_pretrained(tmp_path / "final")
    emb = data.embeddings[:16]
    cg, sg, mg = gpu.predict(emb, top_k=2, return_map=True, map_size=(18, 36))
    cc, sc, mc = cpu.predict(emb, top_k=2, return_map=True, map_size=(18, 36))
    assert mg.device.type == "cpu" and torch.isfinite(cg[:, 0]).all()
    d = great_circle_km(cg[:, 0], cc[:, 0])
    assert (d < 50).float().mean() >= 0.9, d  # float32 network on two devices: close, not bit-equal
