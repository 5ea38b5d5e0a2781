"""Score the shipped Fashion-MNIST images with one convolutional GMM layer (the cGMM op, no training).

The K = 25 components of a 3x3 patch GMM are set to random training patches (sigma = sqrt(20), the original's
initial value); every test patch is then scored by its log-likelihood, and per-image mean scores are printed
per class, next to those of uniform-noise images, which the layer should find far less likely.

    python examples/quickstart.py [--backend auto|reference|cpp|triton]
"""
import argparse
import math

import torch

import dcgmm_fast
from dcgmm_fast import data, ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)

    ds = data.load_shipped()
    K, kernel = 25, 3
    train_patches = ops.patches(ds.x_train[:500], kernel, 1).reshape(-1, kernel * kernel)
    mu = train_patches[torch.randint(0, train_patches.shape[0], (K,), generator=g)]  # (K, D)
    sigma = torch.full_like(mu, math.sqrt(20.0))  # inverse std: std = 0.224
    log_pi = torch.full((K,), -math.log(K))

    def image_scores(x):  # (N, 28, 28, 1) -> (N,) mean per-patch log-likelihood
        out = ops.cgmm(x, mu, sigma, log_pi, kernel=kernel, stride=1, loss="loglik", backend=args.backend)
        return out.score.mean(dim=(1, 2))

    backend = ops.resolve_backend(args.backend, ds.x_test.device)
    print(f"dcgmm_fast {dcgmm_fast.__version__}, backend {backend}: 3x3 patch GMM, K={K}, on "
          f"{ds.x_test.shape[0]} shipped Fashion-MNIST test images")
    scores = image_scores(ds.x_test)
    for c, name in enumerate(data.FASHION_MNIST_CLASSES):
        sel = scores[ds.y_test == c]
        print(f"  class {c} {name:<12} mean score {sel.mean():8.3f}  (min {sel.min():8.3f}, max {sel.max():8.3f})")
    noise = image_scores(torch.rand(100, 28, 28, 1, generator=g))
    print(f"  uniform noise      mean score {noise.mean():8.3f}")
    print(f"test images score higher than noise: {bool(scores.mean() > noise.mean())}")


if __name__ == "__main__":
    main()
