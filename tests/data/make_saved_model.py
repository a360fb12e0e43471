"""Writes tests/data/saved_model_v0.1 and its expected outputs (run once, at commit 1317cb6, before the
package was reorganised; kept so that the fixture can be rebuilt and inspected).  tests/test_layout.py
checks that the current package loads this directory and reproduces the outputs: saved models must
keep loading whatever the package's internal layout."""

import json
import sys
from pathlib import Path

import torch

import locdiff_ext as ld
from locdiff_ext.encoders import SmallCNNEncoder

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "saved_model_v0.1")
torch.manual_seed(0)
enc = SmallCNNEncoder(dim=8, image_size=16, channels=(8, 16))
cfg = ld.LocDiffConfig(cond_dim=8, L=4, widths=(16, 8), time_dim=8, dropout=0.0, num_samples=4, sample_steps=3,
                       retrieval_k=2)
model = ld.LocDiff(cfg, image_encoder=enc).eval()
g = torch.Generator().manual_seed(1)
gallery_emb = torch.randn(12, 8, generator=g)
gallery_coords = torch.stack([torch.rand(12, generator=g) * 120 - 60, torch.rand(12, generator=g) * 360 - 180], 1)
model.set_gallery(gallery_emb, gallery_coords.double())
model.save_pretrained(out)

emb = torch.randn(3, 8, generator=g)
images = torch.rand(2, 3, 16, 16, generator=g)
x_t = torch.randn(3, model.shdd.dim, generator=g)
t = torch.tensor([0, 500, 999])
with torch.no_grad():
    net_out = model.net(x_t, t, model._net_condition(model.condition(emb)))
    image_emb = model.embed(images)
coords, scores, _ = model.predict(emb, top_k=2, seed=0)
expected = {"emb": emb.tolist(), "images": images.tolist(), "x_t": x_t.tolist(), "t": t.tolist(),
            "net_out": net_out.tolist(), "image_emb": image_emb.tolist(), "coords": coords.tolist(),
            "scores": scores.tolist()}
(out.parent / (out.name + ".expected.json")).write_text(json.dumps(expected))
print("wrote", out)
