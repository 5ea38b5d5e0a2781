"""Operations a training step dispatches, per GMM layer: the autograd step against the fused step (issue 23).

    python bench/step_ops.py [--preset D] [--batch 100] [--out FILE]

Counts every ATen and dcgmm op that reaches the dispatcher during one eager training step of the preset (every
layer training), by layer, with ``torch.utils._python_dispatch.TorchDispatchMode``, on CPU tensors with the cpp
backend: once with each layer's autograd step (forward op, autograd's backward op and its glue, the update rule)
and once with the fused step ops (``Trainer(fused_step=True)``). On a GPU every op below is at least one kernel
launch; the cuda backend's two step ops launch 3 + 3 kernels (pack, forward with the block sums, block sums in
order; a memset and two update kernels). No GPU is needed: this measures the host-side structure of the step,
which bounds a small-batch GPU step (gpu_review.md: ~200 launches per step of preset D at batch 100).
"""
import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dcgmm_fast import data
from dcgmm_fast import train
from dcgmm_fast.model import DCGMM
from dcgmm_fast.train import History, Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, header  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.layer = "pools, classifier, history"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[(self.layer, str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))


def count(preset: str, batch: int, fused: bool):
    ds = data.load_shipped()
    model = DCGMM(preset, seed=0, backend="cpp")
    trainer = Trainer(list(model.layers), list(model.names), fused_step=fused)
    h = History()
    x, y = ds.x_train[:batch], ds.y_train[:batch]
    trainer.train_step(x, y, 0.5, h)  # warm-up: lazy registrations, first-call paths
    counter = OpCounter()
    names = {id(layer): name for name, layer in zip(model.names, model.layers)}
    step = train._gmm_step

    def marked(layer, x_, fused_backend=None):  # attribute ops to the layer whose step is running
        counter.layer = names[id(layer)]
        try:
            return step(layer, x_, fused_backend)
        finally:
            counter.layer = "pools, classifier, history"

    train._gmm_step = marked
    try:
        with counter:
            trainer.train_step(x, y, 0.5, h)
    finally:
        train._gmm_step = step
    per_layer = collections.Counter()
    for (layer, _op), n in counter.counts.items():
        per_layer[layer] += n
    return per_layer, counter.counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="D")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = header(f"bench/step_ops.py --preset {args.preset} --batch {args.batch}")
    autograd, _ = count(args.preset, args.batch, False)
    fused, detail = count(args.preset, args.batch, True)
    lines += ["", "| layer | ops, autograd step | ops, fused step |", "|---|---|---|"]
    for layer in sorted(set(autograd) | set(fused)):
        lines.append(f"| {layer} | {autograd[layer]} | {fused[layer]} |")
    lines.append(f"| all | {sum(autograd.values())} | {sum(fused.values())} |")
    lines += ["", "Fused step, ops of one layer's step: " + ", ".join(
        f"{op} x{n}" for (layer, op), n in sorted(detail.items()) if layer == "gmm1")]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
