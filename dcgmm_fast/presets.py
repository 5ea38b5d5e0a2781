"""The paper's DCGMM stacks as data (design.md "Presets"), plus ``demo``, and layer specs to build your own.

A stack is a tuple of specs, bottom-up: ``GMM`` (a fused fold + GMM layer), ``Pool`` and at most one
``Classifier`` (last). Layers are named by kind and position: gmm1, pool1, gmm2, ..., classifier.
Shared GMM defaults (experiment scripts): mu_init 0.1, sigma = sqrt(20) at start, eps0 0.011, eps_inf 0.01,
som_sigma0 = 0.25 sqrt(2K), som_sigma_inf 0.01, SingleExp (delta 0.05, gamma 0.9, window 100),
lambda_mu 1, lambda_sigma 0.1, lambda_pi 0.2; sampling top_s 3, divisor 20; batch 100.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

IntPair = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class GMM:
    """A ConvGMM layer (see ``layers.ConvGMM`` for every field's meaning)."""

    kernel: IntPair
    stride: IntPair
    n_components: int
    mode: str = "shared"
    loss: str = "mc"
    pi_norm: str = "position"
    wait: float = 0.0
    mu_init: float = 0.1
    sigma_upper_bound: float = 20.0
    eps0: float = 0.011
    eps_inf: float = 0.01
    som_sigma0: Optional[float] = None
    som_sigma_inf: float = 0.01
    gamma: float = 0.9
    delta: float = 0.05
    window: Optional[int] = None
    lambda_mu: float = 1.0
    lambda_sigma: float = 0.1
    lambda_pi: float = 0.2
    top_s: int = 3
    divisor: float = 20.0
    sharpen_iterations: int = 0
    sharpen_rate: float = 0.1
    tied_init: bool = False
    sigma_min: float = 1e-2
    init: str = "uniform"


@dataclass(frozen=True)
class Pool:
    """Max-pooling, ceil mode."""

    kernel: IntPair = 2
    stride: IntPair = 2


@dataclass(frozen=True)
class Classifier:
    """Linear read-out of layer ``reads`` (None: the layer just below), SGD with learning rate ``lr``."""

    reads: Optional[str] = None
    lr: float = 0.01


LayerSpec = Union[GMM, Pool, Classifier]


@dataclass(frozen=True)
class Preset:
    """A named stack with its training length and provenance."""

    name: str
    layers: Tuple[LayerSpec, ...]
    input_shape: Tuple[int, int, int] = (28, 28, 1)
    epochs: int = 10
    batch_size: int = 100
    source: str = ""
    out_shapes: Tuple[Tuple[int, ...], ...] = field(default=(), compare=False)  # design.md's table, for tests


def _i(kernel, stride, K, **kw) -> GMM:
    """Independent-mode GMM with the original's global pi normalisation (what the paper ran)."""
    return GMM(kernel, stride, K, mode="independent", pi_norm="global", **kw)


def _s(kernel, stride, K, **kw) -> GMM:
    return GMM(kernel, stride, K, mode="shared", **kw)


PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "A", (_s(28, 2, 49, lambda_pi=0.5, lambda_sigma=0.5), Classifier("gmm1", 0.01)),
            epochs=80, source="outliers-A", out_shapes=((1, 1, 49), (10,)),
        ),
        Preset(
            "B", (_i(8, 2, 49), _s(11, 1, 49, wait=0.1), Classifier("gmm2", 0.01)),
            epochs=80, source="outliers-B", out_shapes=((11, 11, 49), (1, 1, 49), (10,)),
        ),
        Preset(
            "B-class", (_i(4, 2, 121), _s(13, 1, 16, wait=0.1), Classifier("gmm1", 0.05)),
            epochs=15, source="classifier-B", out_shapes=((13, 13, 121), (1, 1, 16), (10,)),
        ),
        Preset(
            "C", (_i(8, 1, 49, tied_init=True), Pool(), _s(11, 1, 49, wait=0.1), Classifier("pool1", 0.05)),
            epochs=15, source="sharpening-C", out_shapes=((21, 21, 49), (11, 11, 49), (1, 1, 49), (10,)),
        ),
        Preset(
            "D",
            (_i(3, 1, 25, top_s=2, sharpen_iterations=300, tied_init=True), Pool(),
             _i(4, 1, 25, wait=0.1, top_s=2, sharpen_iterations=300, tied_init=True), Pool(), _i(5, 1, 25, wait=0.2),
             Classifier("pool1", 0.05)),
            epochs=20, source="sharpening-D",
            out_shapes=((26, 26, 25), (13, 13, 25), (10, 10, 25), (5, 5, 25), (1, 1, 25), (10,)),
        ),
        Preset(
            "E", (_i(3, 1, 25), _i(4, 2, 25, wait=0.1), _s(12, 1, 49, wait=0.2), Classifier("gmm3", 0.01)),
            epochs=80, source="outliers-E", out_shapes=((26, 26, 25), (12, 12, 25), (1, 1, 49), (10,)),
        ),
        Preset(
            "F",
            (_s(3, 1, 25, lambda_pi=0.0), _s(4, 2, 25, wait=0.1, lambda_pi=0.0),
             _s(4, 2, 25, wait=0.2, lambda_pi=0.0), _s(5, 2, 49, wait=0.3, lambda_pi=0.0), Classifier("gmm4", 0.01)),
            epochs=3, source="training-F",
            out_shapes=((26, 26, 25), (12, 12, 25), (5, 5, 25), (1, 1, 49), (10,)),
        ),
        Preset(
            "G",
            (_s(3, 1, 25, lambda_pi=0.0), Pool(), _s(3, 1, 25, lambda_pi=0.0), Pool(), _s(3, 1, 25, lambda_pi=0.0),
             Pool(), _s(2, 2, 25, lambda_pi=0.0), Classifier("gmm2", 0.05)),
            epochs=30, source="DCGMM-G bash, pooling typo fixed",
            out_shapes=((26, 26, 25), (13, 13, 25), (11, 11, 25), (6, 6, 25), (4, 4, 25), (2, 2, 25), (1, 1, 25),
                        (10,)),
        ),
        Preset(
            "svhn", (_i(12, 5, 64), _s(5, 5, 100, wait=0.1), Classifier("gmm2", 0.01)),
            input_shape=(32, 32, 3), epochs=120, source="sampling-svhn-B",
            out_shapes=((5, 5, 64), (1, 1, 100), (10,)),
        ),
        # Ours: bigger colour images (64 x 64 x 3, e.g. an image folder resized), three shared layers.
        Preset(
            "rgb64",
            (_s(8, 4, 49), Pool(), _s(4, 2, 49, wait=0.1), _s(3, 1, 64, wait=0.2), Classifier("pool1", 0.05)),
            input_shape=(64, 64, 3), epochs=20, source="dcgmm_fast rgb64",
            out_shapes=((15, 15, 49), (8, 8, 49), (3, 3, 49), (1, 1, 64), (10,)),
        ),
        # Ours, for the README's main job: seconds on 2 CPU cores. Preset D's architecture (its top GMM sees the
        # whole image, so unconditional samples have a shape; a shared first layer samples textures) with a short
        # SingleExp window (5 steps) so that som_sigma anneals within the 500 steps of 10 epochs of the 5,000
        # shipped images.
        Preset(
            "demo",
            (_i(3, 1, 25, top_s=2, window=5, sharpen_iterations=300, tied_init=True), Pool(),
             _i(4, 1, 25, wait=0.1, top_s=2, window=5, sharpen_iterations=300, tied_init=True), Pool(),
             _i(5, 1, 25, wait=0.2, window=5), Classifier("pool1", 0.1)),
            epochs=10, source="dcgmm_fast demo",
            out_shapes=((26, 26, 25), (13, 13, 25), (10, 10, 25), (5, 5, 25), (1, 1, 25), (10,)),
        ),
    ]
}


def get_preset(name: Union[str, Preset]) -> Preset:
    """A preset by name (``PRESETS``' keys), or the preset itself."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def with_overrides(spec: GMM, **changes) -> GMM:
    """A copy of a GMM spec with some fields changed (e.g. ``loss="loglik"``)."""
    return dataclasses.replace(spec, **changes)


# ------------------------------------------------------------------------------------------------ overrides
def parse_value(text: str):
    """A ``--set`` value: a Python literal (int, float, bool, None, tuple, list, quoted str) or, failing that, the
    bare string (e.g. ``loglik``)."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(where: str, value, default):
    """value checked against the type of the field's default (ints where ints are, floats accept ints, ...)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected True or False, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an int, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(value, list):
        value = tuple(value)
    return value


def override(stack: Union[str, Preset, Sequence[LayerSpec]], settings: Dict[str, object]):
    """A preset (or a list of layer specs) with fields changed, as ``dcgmm train --set`` does.

    Keys: ``LAYER.FIELD`` for one layer (``gmm2.n_components``, ``pool1.kernel``, ``classifier.lr``; layers are
    named as in the model: gmm1.., pool1.., classifier), ``gmm.FIELD`` for every GMM layer (e.g. ``gmm.sigma_min``,
    the sigma floor), or a preset field (``epochs``, ``batch_size``, ``input_shape``). Values are checked against the
    field's type; the layer's own checks (e.g. a perfect-square K for the mc loss) run when the model is built.

    Raises:
        ValueError: naming the key: an unknown layer or field, or a value of the wrong type.
    """
    preset = get_preset(stack) if isinstance(stack, (str, Preset)) else None
    layers = list(preset.layers if preset is not None else stack)
    names, counts = [], {"gmm": 0, "pool": 0}
    for spec in layers:
        if isinstance(spec, GMM):
            counts["gmm"] += 1
            names.append(f"gmm{counts['gmm']}")
        elif isinstance(spec, Pool):
            counts["pool"] += 1
            names.append(f"pool{counts['pool']}")
        else:
            names.append("classifier")
    top: Dict[str, object] = {}
    for key, value in settings.items():
        where, _, field = key.rpartition(".")
        if not where:
            if preset is None or field not in {f.name for f in dataclasses.fields(Preset)} or field in ("name",
                                                                                                      "layers"):
                raise ValueError(f"{key}: expected LAYER.FIELD (layers: {', '.join(names)}, or gmm.FIELD for every "
                                 "GMM) or a preset field (epochs, batch_size, input_shape)")
            default = 1.0 if field == "epochs" else getattr(preset, field)  # fractional epochs are fine
            top[field] = _coerce(key, value, default)
            continue
        targets = [i for i, n in enumerate(names) if n == where or (where == "gmm" and n.startswith("gmm"))]
        if not targets:
            raise ValueError(f"{key}: no layer {where!r} in this stack (layers: {', '.join(names)}; gmm = every GMM)")
        for i in targets:
            spec = layers[i]
            fields = {f.name: f for f in dataclasses.fields(spec)}
            if field not in fields:
                raise ValueError(f"{key}: {type(spec).__name__} has no field {field!r} (fields: "
                                 f"{', '.join(sorted(fields))})")
            layers[i] = dataclasses.replace(spec, **{field: _coerce(key, value, getattr(spec, field))})
    if preset is None:
        if top:
            raise ValueError(f"{', '.join(top)}: a list of layers has no preset fields")
        return layers
    return dataclasses.replace(preset, layers=tuple(layers), **top)
