"""End-to-end training time of one epoch of a preset on the shipped data, per backend.

    python bench/train_epoch.py --preset D --backends reference cpp [--out bench/results/train_epoch_D.md]

Each backend trains a freshly seeded model for one epoch on the 5,000 shipped Fashion-MNIST images (batch 100,
50 steps, the original update rule) and reports wall time, steps per second, the speed-up over the first backend
listed, and the mean test log-likelihood per layer afterwards (so a fast but wrong backend shows).
"""
import argparse
import os
import sys
import time

from dcgmm_fast import data
from dcgmm_fast.model import DCGMM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="D")
    parser.add_argument("--backends", nargs="+", default=["reference", "cpp"])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ds = data.load_shipped()
    rows = []
    for backend in args.backends:
        model = DCGMM(args.preset, seed=0, backend=backend)
        t = time.perf_counter()
        history = model.fit(ds.x_train, ds.y_train, epochs=args.epochs, seed=0).history_
        seconds = time.perf_counter() - t
        scores = {k: round(v.mean().item(), 3) for k, v in model.log_prob(ds.x_test[:500]).items()}
        rows.append((backend, seconds, history.steps, scores))
        print(f"{backend}: {seconds:.1f} s for {history.steps} steps; test loglik {scores}", flush=True)
    base = rows[0][1]
    lines = header(f"One training epoch of preset {args.preset} on the shipped data") + [
        "| backend | seconds | steps/s | speed-up | mean test log-likelihood per layer (500 images) |",
        "|---|---|---|---|---|",
    ]
    for backend, seconds, steps, scores in rows:
        lines.append(f"| {backend} | {seconds:.1f} | {steps / seconds:.2f} | {base / seconds:.1f}x | {scores} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
