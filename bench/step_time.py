"""Median time of one eager training step of a preset's stack (every layer training), per backend.

    python bench/step_time.py --presets B-class D --backends cpp [--steps 15] [--batch 100] [--out FILE]

Measures ``Trainer(layers, names).train_step(x, y, progress, history)`` on shipped images (batch 100 by default,
progress 0.5 so that every layer's wait has passed), after 5 warm-up steps, median of ``--steps`` steps, with the
torch thread count given by ``--threads`` (default 2). The original TF2 code's step times (measured on the same
kind of 2-core machine: 417 ms classifier-B, 387 ms D) are printed beside ours as a fixed anchor.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from dcgmm_fast import data
from dcgmm_fast.model import DCGMM
from dcgmm_fast.presets import get_preset
from dcgmm_fast.train import History, Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, header  # noqa: E402

ORIGINAL_MS = {"B-class": 417.0, "D": 387.0}


def images(preset: str):
    """(x, y) to train on: the shipped Fashion-MNIST images, or random images of the preset's input shape (svhn)."""
    ds = data.load_shipped()
    shape = get_preset(preset).input_shape
    if tuple(ds.x_train.shape[1:]) == shape:
        return ds.x_train, ds.y_train
    g = torch.Generator().manual_seed(0)
    return torch.rand(ds.x_train.shape[0], *shape, generator=g), ds.y_train


def step_ms(preset: str, backend: str, steps: int, batch: int) -> float:
    xs, ys = images(preset)
    model = DCGMM(preset, seed=0, backend=backend)
    trainer = Trainer(list(model.layers), list(model.names))
    history = History()
    times = []
    for i in range(5 + steps):
        lo = (i * batch) % (xs.shape[0] - batch)
        x, y = xs[lo:lo + batch], ys[lo:lo + batch]
        t = time.perf_counter()
        trainer.train_step(x, y, 0.5, history)
        if i >= 5:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["B-class", "D"])
    parser.add_argument("--backends", nargs="+", default=["cpp"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = header(f"Eager training step {args.label}", args.threads) + [
        "| preset | backend | batch | median ms/step | original TF2 ms/step | speed-up over the original |",
        "|---|---|---|---|---|---|",
    ]
    for preset in args.presets:
        for backend in args.backends:
            ms = step_ms(preset, backend, args.steps, args.batch)
            orig = ORIGINAL_MS.get(preset)
            ratio = f"{orig / ms:.1f}x" if orig and args.batch == 100 else "-"
            lines.append(f"| {preset} | {backend} | {args.batch} | {ms:.1f} | {orig or '-'} | {ratio} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
