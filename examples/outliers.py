"""Outlier scoring: the per-image score of the top GMM (score_samples, spec 3.5) ranks test images above noise
and above images of an unseen kind; AUROC of in-distribution vs each.

    python examples/outliers.py [--epochs 10] [--out runs/examples]
"""
import torch

from _common import parser, trained_demo
from dcgmm_fast.metrics import auroc


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, ds = trained_demo(args)
    g = torch.Generator().manual_seed(0)
    inliers = ds.x_test[:500]
    noise = torch.rand(500, 28, 28, 1, generator=g)
    flipped = ds.x_test[:500].flip(1)                             # upside-down garments: a shift of kind
    s_in = model.score_samples(inliers)
    for name, other in (("uniform noise", noise), ("upside-down images", flipped)):
        s_out = model.score_samples(other)
        print(f"{name:20s} AUROC {auroc(s_in, s_out):.3f}  (mean score {float(s_in.mean()):.2f} in, "
              f"{float(s_out.mean()):.2f} out)")


if __name__ == "__main__":
    main()
