"""Types every part of the package shares (a leaf module: imports nothing of the package).

``CGMMOut`` is what every backend's cGMM op returns; the ``Literal`` aliases name the string options.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]
"""An int ``k`` (meaning ``(k, k)``) or a pair ``(h, w)``: kernel sizes, strides."""

Shape3 = Tuple[int, int, int]
"""(H, W, C) of one NHWC image or feature map."""

Loss = Literal["mc", "loglik"]
"""``"mc"``: smoothed max-component score (the paper's loss); ``"loglik"``: exact per-patch log-likelihood."""

Mode = Literal["shared", "independent"]
"""``"shared"``: one GMM for all patch positions (the paper's convMode); ``"independent"``: one per position."""

PiNorm = Literal["position", "global"]
"""How ``pi_logits`` become log weights in independent mode: ``"position"`` a softmax per position (clean);
``"global"`` one softmax over all positions and components, the original's quirk (spec 1.1) the presets use."""

Backend = Literal["auto", "reference", "cpp", "triton", "cuda"]
"""``"auto"``: DCGMM_BACKEND if set, else the fastest built backend for the device; ``"reference"``: pure
PyTorch (the oracle); ``"cpp"``: fused C++ CPU kernels; ``"triton"``: fused Triton kernels (CUDA, or CPU under
TRITON_INTERPRET=1); ``"cuda"``: hand-written CUDA kernels. The names are those of the registry in
``dcgmm_fast.backends`` (a test keeps the two equal)."""


class CGMMOut(NamedTuple):
    """Outputs of the cGMM op.

    resp:  (N, H', W', K) posterior responsibilities softmax_k(log_score), the layer's output.
    score: (N, H', W') per-patch score, higher is better (log-likelihood, or smoothed max-component).
    lse:   (N, H', W') logsumexp_k(log_score), saved for backward.
    kstar: (N, H', W') int32 winning component of the max (ties -> lowest index).
    """

    resp: torch.Tensor
    score: torch.Tensor
    lse: torch.Tensor
    kstar: torch.Tensor
