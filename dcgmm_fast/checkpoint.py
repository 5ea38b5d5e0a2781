"""Checkpoints: the model's state_dict (parameters, annealing buffers, steps done) plus its config and the
training plan, in a file that loads with ``torch.load(weights_only=True)`` (no pickled code).

    save_checkpoint(path, model, train={"epochs": 10, "batch_size": 100, "seed": 0, "data": "shipped"})
    model, train = load_checkpoint(path)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import torch

from . import presets
from .atomic import atomic_open
from .model import DCGMM

FORMAT = "dcgmm_fast-checkpoint-v1"
_KINDS = {"GMM": presets.GMM, "Pool": presets.Pool, "Classifier": presets.Classifier}


class CheckpointError(ValueError):
    """A file that is not a usable dcgmm_fast checkpoint; the message names the file."""


def model_config(model: DCGMM) -> Dict[str, Any]:
    """Plain data (str / int / float / list / dict) that rebuilds the model's architecture."""
    return {
        "preset": model.preset.name if model.preset is not None else None,
        "layers": [{"kind": type(s).__name__, **dataclasses.asdict(s)} for s in model.specs],
        "input_shape": list(model.input_shape),
        "n_classes": model.n_classes,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def specs_from_config(config: Dict[str, Any]) -> list:
    """The layer specs (presets.GMM / Pool / Classifier) of a config's "layers"."""
    specs = []
    for spec in config["layers"]:
        fields = dict(spec)
        kind = _KINDS[fields.pop("kind")]
        for key in ("kernel", "stride"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        specs.append(kind(**fields))
    return specs


def model_from_config(config: Dict[str, Any], *, backend: str = "auto", seed=None) -> DCGMM:
    specs = specs_from_config(config)
    name = config.get("preset")
    stack = name if name in presets.PRESETS and presets.PRESETS[name].layers == tuple(specs) else specs
    name_dtype = config.get("dtype", "float32")
    if name_dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected float32 or float64 parameters, got {name_dtype!r}")
    dtype = getattr(torch, name_dtype)
    return DCGMM(stack, tuple(config["input_shape"]), config["n_classes"], backend=backend, dtype=dtype, seed=seed)


_POSITIVE_INTS = ("n_components", "top_s", "window")
_STRINGS = ("mode", "loss", "pi_norm", "reads", "init")
_BOOLS = ("tied_init",)


def _check_field(where: str, key: str, value, default) -> None:
    """A stack file's field: its JSON type (the values themselves are checked by the layers, naming the field)."""
    if key in ("kernel", "stride"):
        pair = value if isinstance(value, list) else [value]
        if len(pair) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise ValueError(f"{where}.{key}: expected a positive int or [int, int], got {value!r}")
    elif value is None:
        if default is not None:
            raise ValueError(f"{where}.{key}: expected a value, got null")
    elif key in _POSITIVE_INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}.{key}: expected a positive int, got {value!r}")
    elif key in _STRINGS:
        if not isinstance(value, str):
            raise ValueError(f"{where}.{key}: expected a string, got {value!r}")
    elif key in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.{key}: expected a number, got {value!r}")


def load_stack(path: str) -> Dict[str, Any]:
    """A stack file (``dcgmm train --stack``): JSON in the checkpoint's architecture format, e.g.
    ``{"input_shape": [28, 28, 1], "n_classes": 10, "layers": [{"kind": "GMM", "kernel": 3, "stride": 1,
    "n_components": 25}, {"kind": "Pool"}, {"kind": "Classifier", "reads": "pool1"}]}``; every field of a layer
    kind (``presets.GMM``, ``Pool``, ``Classifier``) may be given, the others take their defaults. Returns the
    config for ``model_from_config``.

    Raises:
        ValueError: naming the file and the field (``layers[2].kernel: ...``).
    """
    import json

    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    try:
        if not isinstance(config, dict):
            raise ValueError("expected a JSON object with 'layers' (and 'input_shape', 'n_classes')")
        unknown = set(config) - {"layers", "input_shape", "n_classes", "preset", "dtype"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown field (known: layers, input_shape, n_classes, dtype)")
        shape = config.setdefault("input_shape", [28, 28, 1])
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise ValueError(f"input_shape: expected [H, W, C] positive ints, got {shape!r}")
        n_classes = config.setdefault("n_classes", 10)
        if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
            raise ValueError(f"n_classes: expected an int >= 2, got {n_classes!r}")
        layers = config.get("layers")
        if not isinstance(layers, list) or not layers:
            raise ValueError(f"layers: expected a non-empty list of layer objects, got {layers!r}")
        for i, layer in enumerate(layers):
            where = f"layers[{i}]"
            if not isinstance(layer, dict):
                raise ValueError(f"{where}: expected an object with 'kind', got {layer!r}")
            kind = _KINDS.get(layer.get("kind"))
            if kind is None:
                raise ValueError(f"{where}.kind: expected one of {sorted(_KINDS)}, got {layer.get('kind')!r}")
            fields = {f.name: f for f in dataclasses.fields(kind)}
            for key, value in layer.items():
                if key == "kind":
                    continue
                if key not in fields:
                    raise ValueError(f"{where}.{key}: unknown field of {layer['kind']} (known: {', '.join(fields)})")
                default = fields[key].default
                _check_field(where, key, value, None if default is dataclasses.MISSING else default)
            missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in layer]
            if missing:
                raise ValueError(f"{where}.{missing[0]}: missing (a {layer['kind']} needs {', '.join(missing)})")
        config.setdefault("preset", None)
        try:
            model_from_config(config)  # values out of range, a kernel larger than its input, ... fail here
        except ValueError as e:
            for i in range(1, len(layers) + 1):  # the first layer that fails, for the message
                try:
                    model_from_config({**config, "layers": layers[:i]})
                except ValueError:
                    raise ValueError(f"layers[{i - 1}]: {e}") from None
            raise
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def save_checkpoint(path: str, model: DCGMM, train: Dict[str, Any] = None) -> None:
    """Write model state, config and the training plan (``train``: plain data) to ``path``, atomically (a kill
    during the write leaves the previous file intact; ``atomic.atomic_open``)."""
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, "config": model_config(model), "state_dict": model.state_dict(),
                    "train": dict(train or {})}, f)


def load_checkpoint(path: str, *, backend: str = "auto", map_location="cpu") -> Tuple[DCGMM, Dict[str, Any]]:
    """Load a checkpoint safely (``weights_only=True``); returns (model, training plan).

    Raises:
        CheckpointError: missing, truncated or tampered file, or a file that is not a dcgmm_fast checkpoint.
    """
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged or unsafe files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dcgmm_fast checkpoint (expected format {FORMAT!r})")
    try:
        model = model_from_config(blob["config"], backend=backend)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return model, dict(blob.get("train", {}))
