"""Pictures of a trained model: each GMM layer's prototypes and the training curves (``dcgmm show``).

- ``prototypes(model, name)``: (K, H, W, C) images of GMM ``name``'s components. The layer on the images shows
  each component's mean as its patch (independent mode: at the centre position); an upper layer's component k is
  back-projected to the image (spec 3.1: a one-hot prior on k at every position, top_s 1, noise off), so it shows
  what that component stands for in pixels.
- ``plot_curves(log, ...)``: line charts (Pillow only, no plotting library) of train_log.jsonl's per-layer score,
  som_sigma and eps and the classifier's accuracy over steps.
"""
from __future__ import annotations

import json
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .layers import ConvGMM
from .sampling import sample_down

#: line colours of the curves, one per layer
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


@torch.no_grad()
def prototypes(model, name: str) -> torch.Tensor:
    """(K, H, W, C) in [0, 1]: the components of GMM ``name`` as images (see the module)."""
    layer = model[name]
    if not isinstance(layer, ConvGMM):
        raise ValueError(f"name: {name!r} is not a GMM layer of this model ({list(model.gmm_layers())})")
    first = model.names.index(name) == 0
    K = layer.n_components
    if first:
        (kh, kw), (_, _, C) = layer.kernel, layer.in_shape
        mu = layer.mu.detach().reshape(-1, K, layer.D)  # (P or 1, K, D)
        mu = mu[mu.shape[0] // 2]  # independent: the centre position's GMM
        return mu.reshape(K, kh, kw, C).clamp(0, 1).cpu()
    Ho, Wo, _ = layer.out_shape
    topdown = torch.eye(K, dtype=layer.mu.dtype, device=layer.mu.device)[:, None, None, :].expand(K, Ho, Wo, K)
    x = sample_down(model.layers, model.names, name, topdown.contiguous(), top_s=1, divisor=1e12, sharpening=False)
    return x.clamp(0, 1).cpu()


def read_log(path: str) -> List[dict]:
    """The complete lines of a train_log.jsonl (a cut last line is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _series(log: Sequence[dict], key: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{layer: (steps, values)} of a per-layer quantity, or {"classifier": ...} for a scalar one."""
    out: Dict[str, Tuple[list, list]] = {}
    for entry in log:
        value = entry.get(key)
        if value is None:
            continue
        items = value.items() if isinstance(value, dict) else [("classifier", value)]
        for name, v in items:
            if v is None or not np.isfinite(v):
                continue
            steps, values = out.setdefault(name, ([], []))
            steps.append(entry["step"])
            values.append(float(v))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in out.items()}


def plot_curves(log: Sequence[dict], keys=("score", "som_sigma", "eps", "classifier_accuracy"),
                size: Tuple[int, int] = (420, 220)) -> np.ndarray:
    """(H, W, 3) uint8: one panel per key (stacked), one line per layer, the value range and the step range as
    text, a legend of layer names."""
    from PIL import Image, ImageDraw

    W, H = size
    panels = []
    for key in keys:
        series = _series(log, key)
        if not series:
            continue
        img = Image.new("RGB", (W, H), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = 60, 18, W - 10, H - 22
        draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
        s_all = np.concatenate([s for s, _ in series.values()])
        v_all = np.concatenate([v for _, v in series.values()])
        s0, s1 = float(s_all.min()), float(max(s_all.max(), s_all.min() + 1))
        v0, v1 = float(v_all.min()), float(v_all.max())
        if v1 <= v0:
            v0, v1 = v0 - 1.0, v1 + 1.0
        for i, (name, (s, v)) in enumerate(series.items()):
            xs = left + (s - s0) / (s1 - s0) * (right - left)
            ys = bottom - (v - v0) / (v1 - v0) * (bottom - top)
            colour = COLOURS[i % len(COLOURS)]
            if len(xs) > 1:
                draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
            else:
                draw.ellipse((xs[0] - 2, ys[0] - 2, xs[0] + 2, ys[0] + 2), fill=colour)
            draw.text((left + 6 + 70 * i, top + 3), name, fill=colour)
        draw.text((4, 2), key, fill=(0, 0, 0))
        draw.text((4, top), f"{v1:.4g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{v0:.4g}", fill=(0, 0, 0))
        draw.text((left, bottom + 4), f"step {int(s0)}", fill=(0, 0, 0))
        draw.text((right - 70, bottom + 4), f"step {int(s1)}", fill=(0, 0, 0))
        panels.append(np.asarray(img))
    if not panels:
        raise ValueError("log: no curves to draw (an empty train_log.jsonl?)")
    return np.concatenate(panels, axis=0)
