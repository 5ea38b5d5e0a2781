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


def model_from_config(config: Dict[str, Any], *, backend: str = "auto") -> DCGMM:
    specs = []
    for spec in config["layers"]:
        fields = dict(spec)
        kind = _KINDS[fields.pop("kind")]
        for key in ("kernel", "stride"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        specs.append(kind(**fields))
    name = config.get("preset")
    stack = name if name in presets.PRESETS and presets.PRESETS[name].layers == tuple(specs) else specs
    name_dtype = config.get("dtype", "float32")
    if name_dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected float32 or float64 parameters, got {name_dtype!r}")
    dtype = getattr(torch, name_dtype)
    return DCGMM(stack, tuple(config["input_shape"]), config["n_classes"], backend=backend, dtype=dtype)


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
