"""Per-layer profile of one training step of a preset's stack: where the milliseconds go.

    python bench/profile_layers.py --presets B-class D C E [--backend cpp] [--batch 100] [--steps 15] [--out FILE]

For every layer of the stack (inputs from a forward pass of shipped images, progress 0.5 so that every layer
trains), the median over ``--steps`` repetitions of:
- GMM layers: forward only (``cgmm`` under no_grad), forward without the smoothing, and the whole training step
  (``train.gmm_step``: forward, backward, update, mean score); backward + update = step - forward.
- pooling: the forward; the classifier: its SGD step.
The last column is the layer's share of the sum of its row's step times.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from dcgmm_fast import data
from dcgmm_fast.layers import ConvGMM, LinearClassifier, MaxPool
from dcgmm_fast.model import DCGMM
from dcgmm_fast.train import classifier_step, gmm_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, header  # noqa: E402


def median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def profile(preset: str, backend: str, batch: int, steps: int):
    """Rows (layer, kind, shape, forward ms, forward-without-smoothing ms, step ms)."""
    ds = data.load_shipped()
    model = DCGMM(preset, seed=0, backend=backend)
    x, y = ds.x_train[:batch], ds.y_train[:batch]
    rows, outputs, h = [], {}, x
    for name, layer in zip(model.names, model.layers):
        if isinstance(layer, ConvGMM):
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            g = layer.smoothing if not layer.smoothing_is_identity else None
            shape = f"{'indep' if layer.mode == 'independent' else 'shared'} P={layer.P} K={layer.n_components} " \
                    f"D={layer.D}{' G' if g is not None else ''}"

            def fwd(layer=layer, h=h):
                with torch.no_grad():
                    layer.cgmm(h, check=False)

            def fwd_plain(layer=layer, h=h):
                with torch.no_grad():
                    layer.cgmm(h, "loglik", check=False)

            t_f, t_p = median_ms(fwd, steps), median_ms(fwd_plain, steps)
            t_s = median_ms(lambda layer=layer, h=h: gmm_step(layer, h), steps)
            layer.load_state_dict(state)  # the profiled steps moved the parameters
            with torch.no_grad():
                h = layer.cgmm(h, check=False).resp
            rows.append([name, shape, t_f, t_p, t_s])
        elif isinstance(layer, MaxPool):
            t = median_ms(lambda layer=layer, h=h: layer(h), steps)
            with torch.no_grad():
                h = layer(h)
            rows.append([name, f"pool -> {tuple(h.shape[1:])}", t, t, t])
        elif isinstance(layer, LinearClassifier):
            feats = outputs[layer.reads]
            state = {k: v.clone() for k, v in layer.state_dict().items()}
            t = median_ms(lambda layer=layer, f=feats: classifier_step(layer, f, y), steps)
            layer.load_state_dict(state)
            rows.append([name, f"linear {feats[0].numel()} -> 10", float("nan"), float("nan"), t])
        outputs[name] = h
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["B-class", "D", "C", "E"])
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = header(f"Per-layer profile of a training step {args.label}", args.threads)
    lines += [f"backend {args.backend}, batch {args.batch}, median of {args.steps}", ""]
    for preset in args.presets:
        rows = profile(preset, args.backend, args.batch, args.steps)
        total = sum(r[4] for r in rows)
        lines += [f"## {preset}: sum of step times {total:.1f} ms", "",
                  "| layer | shape | forward ms | forward, no smoothing ms | step ms | bwd + update ms | share |",
                  "|---|---|---|---|---|---|---|"]
        for name, shape, t_f, t_p, t_s in rows:
            bwd = t_s - t_f if t_f == t_f and "pool" not in shape else float("nan")
            lines.append(f"| {name} | {shape} | {t_f:.2f} | {t_p:.2f} | {t_s:.2f} | {bwd:.2f} | "
                         f"{100 * t_s / total:.0f}% |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
