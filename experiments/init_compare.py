"""What initialising the means from data does (issue 24): presets B-class and D trained a few epochs on the full
Fashion-MNIST with init "uniform" (the original), "data" and "kmeans++" for every GMM layer; test accuracy of the
read-out and each layer's mean test log-likelihood.

    python experiments/init_compare.py [--data ../shared/data/fashion_mnist.npz] [--epochs 2] [--seed 0]

Writes experiments/results/init-compare/metrics.json and table.md.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

from dcgmm_fast import data, presets
from dcgmm_fast.model import DCGMM

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "fashion_mnist.npz"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="+", default=["B-class", "D"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "init-compare"))
    args = ap.parse_args(argv)
    ds = data.load_dataset(args.data)
    rows = []
    for name in args.presets:
        for init in ("uniform", "data", "kmeans++"):
            preset = presets.override(name, {"gmm.init": init})
            model = DCGMM(preset, ds.x_train.shape[1:], ds.n_classes, seed=args.seed)
            t0 = time.time()
            model.fit(ds.x_train, ds.y_train, epochs=args.epochs, seed=args.seed, verbose=False)
            seconds = time.time() - t0
            acc = float((model.predict(ds.x_test) == ds.y_test).float().mean())
            ll = {k: round(float(v.mean()), 4) for k, v in model.log_prob(ds.x_test).items()}
            rows.append({"preset": name, "init": init, "epochs": args.epochs, "test_accuracy": round(acc, 4),
                         "test_loglik": ll, "train_seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    given = sys.argv[1:] if argv is None else list(argv)
    meta = {"command": " ".join(["python experiments/init_compare.py"] + given), "seed": args.seed,
            "data": os.path.basename(args.data), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"rows": rows, **meta}, f, indent=2)
    lines = [f"# Initialisation from data: {args.epochs:g} epochs, seed {args.seed}", "",
             f"`{meta['command'].strip()}`, {meta['date']}, {meta['machine']['platform']}", "",
             "| preset | init | test accuracy | mean test log-likelihood per layer | train s |",
             "|---|---|---|---|---|"]
    for r in rows:
        ll = ", ".join(f"{k} {v:.2f}" for k, v in r["test_loglik"].items())
        lines.append(f"| {r['preset']} | {r['init']} | {r['test_accuracy']:.4f} | {ll} | {r['train_seconds']} |")
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
