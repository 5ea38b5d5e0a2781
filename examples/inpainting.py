"""In-painting: complete the right half of test images, by sampling (variants, spec 3.4) and by the most probable
explanation (MPE: per patch the best component given the visible pixels, deterministic).

    python examples/inpainting.py [--epochs 10] [--out runs/examples]
"""
import os

import torch

from _common import parser, trained_demo
from dcgmm_fast.images import save_grid


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, ds = trained_demo(args)
    x = ds.x_test[:8]
    mask = torch.ones(28, 28, dtype=torch.bool)
    mask[:, 14:] = False                                          # True = known pixel: the left half
    sampled = model.inpaint(x, mask, generator=torch.Generator().manual_seed(0))
    mpe = model.inpaint(x, mask, mode="mpe")
    hidden = torch.where(mask[None, ..., None], x, torch.zeros_like(x))
    for name, images in (("sampled", sampled), ("mpe", mpe)):
        err = float(((images - x)[:, :, 14:] ** 2).mean().sqrt())
        print(f"{name:8s} RMSE on the hidden half: {err:.3f}")
    path = os.path.join(args.out, "inpainting.png")
    save_grid(path, torch.cat([x, hidden, sampled, mpe]), 8)
    print(f"rows: original, masked, sampled, MPE -> {path}")


if __name__ == "__main__":
    main()
