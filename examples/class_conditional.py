"""Class-conditional sampling: eight samples of every class, the class prior set through the linear read-out
(DCGMM.sample(classes=...), guided by the model's own top-down sample).

    python examples/class_conditional.py [--epochs 10] [--out runs/examples]
"""
import os

import torch

from _common import parser, trained_demo
from dcgmm_fast.images import save_grid


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, ds = trained_demo(args)
    classes = torch.arange(ds.n_classes).repeat_interleave(8)
    images = model.sample(len(classes), classes=classes, generator=torch.Generator().manual_seed(0))
    agree = float((model.predict(images) == classes).float().mean())
    print(f"{len(classes)} samples; the model's own read-out labels {agree:.0%} of them as the requested class")
    path = os.path.join(args.out, "class_conditional.png")
    save_grid(path, images, 8, row_labels=list(ds.class_names or range(ds.n_classes)))
    print(f"one row per class -> {path}")


if __name__ == "__main__":
    main()
