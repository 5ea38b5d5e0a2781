"""Marginal queries: the bottom GMM's log-likelihood of the visible pixels only (unknown pixels integrated out
exactly), compared across masks, and the component assignments of each layer.

    python examples/marginal.py [--epochs 10] [--out runs/examples]
"""
import torch

from _common import parser, trained_demo


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    model, ds = trained_demo(args)
    x = ds.x_test[:200]
    full = model.log_prob(x)["gmm1"]
    top = torch.zeros(28, 28, dtype=torch.bool)
    top[:14] = True                                               # only the top half is known
    half = model.log_prob(x, mask=top)["gmm1"]
    print(f"mean per-patch log-likelihood, all pixels: {float(full.mean()):.3f}; top half only: "
          f"{float(half.mean()):.3f} (fewer dimensions: higher)")
    print("an all-True mask gives the plain score:",
          bool(torch.equal(model.log_prob(x, mask=torch.ones(28, 28, dtype=torch.bool))["gmm1"], full)))
    comps = model.predict_components(x[:1])
    for name, k in comps.items():
        print(f"{name}: components of image 0 at its {k[0].numel()} positions, {len(k[0].unique())} distinct")


if __name__ == "__main__":
    main()
