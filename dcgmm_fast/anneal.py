"""SingleExp, the original's annealing of eps and som_sigma (spec 1.8), on the host and on the device.

``SingleExp`` is the host reference, line by line the original's ``layer/regularizer/SingleExp.py``.
``anneal_`` is the same controller as tensor ops on a layer's own buffers (``anneal_state``, ``eps``,
``som_sigma``) and its smoothing factors: no host reads, so a training step that anneals stays capturable
(CUDA graphs, ``torch.compile(fullgraph=True)``). Both do the same float64 arithmetic in the same order, so
they take the same decisions at the same steps and agree bit for bit (``tests/test_train.py``).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .geometry import smoothing_factors_of
from .layers import ConvGMM


def _f32(v: float) -> float:
    """Round to float32, as the original keeps eps and som_sigma in float32 TF variables."""
    return float(np.float32(v))


class SingleExp:
    """The original's annealing controller (``layer/regularizer/SingleExp.py``, spec 1.8).

    Fed one loss per training step (the layer's mean score, smoothing included). Every ``window`` steps it
    compares the mean of the window's first W-1 losses with the previous window's: when the improvement
    ratio r = (avg - last) / (last - first) lies in (-2 delta, delta), eps and som_sigma shrink by gamma,
    floored at eps_inf and som_sigma_inf.
    """

    def __init__(self, eps0: float, eps_inf: float, som_sigma0: float, som_sigma_inf: float, window: int,
                 gamma: float = 0.9, delta: float = 0.05):
        self.eps, self.som_sigma = _f32(eps0), _f32(som_sigma0)
        self.eps_inf, self.som_sigma_inf = _f32(eps_inf), _f32(som_sigma_inf)
        self.window, self.gamma, self.delta = int(window), _f32(gamma), float(delta)
        self.it, self.avg, self.first, self.last, self.events = 0, 0.0, 0.0, 0.0, 0

    def add(self, loss: float) -> None:
        """Running mean of the current window."""
        i = self.it % self.window
        if i == 0:
            self.avg = 0.0
        self.avg = self.avg * i / (i + 1) + float(loss) / (i + 1)
        self.it += 1

    def check(self) -> bool:
        """At the end of a window, compare with the last one; returns True when eps and som_sigma shrank."""
        if self.it % self.window != self.window - 1:
            return False
        reduced = False
        if self.events == 0:
            self.first = self.last = self.avg
        elif self.events == 1:
            self.last = self.avg
        else:
            with np.errstate(divide="ignore", invalid="ignore"):  # numpy semantics: x/0 -> inf/nan -> no change
                r = float(np.float64(self.avg - self.last) / np.float64(self.last - self.first))
            if -2 * self.delta < r < self.delta:
                self.eps = max(_f32(self.eps * self.gamma), self.eps_inf)
                self.som_sigma = max(_f32(self.som_sigma * self.gamma), self.som_sigma_inf)
                reduced = True
            self.last = self.avg
        self.events += 1
        return reduced

    def step(self, loss: float) -> bool:
        """``add`` then ``check``: what the original does after every training step."""
        self.add(loss)
        return self.check()

    def counters(self) -> List[float]:
        """(it, avg, first, last, events), for ``ConvGMM.anneal_state``."""
        return [float(self.it), self.avg, self.first, self.last, float(self.events)]

    def load_counters(self, values: Sequence[float], eps: float, som_sigma: float) -> None:
        it, self.avg, self.first, self.last, events = (float(v) for v in values)
        self.it, self.events = int(it), int(events)
        self.eps, self.som_sigma = _f32(eps), _f32(som_sigma)

    @classmethod
    def for_layer(cls, layer: ConvGMM) -> "SingleExp":
        """A controller with the layer's hyper-parameters and its saved state."""
        c = cls(layer.eps0, layer.eps_inf, layer.som_sigma0, layer.som_sigma_inf, layer.window,
                layer.gamma, layer.delta)
        c.load_counters(layer.anneal_state.tolist(), float(layer.eps), float(layer.som_sigma))
        return c


@torch.no_grad()
def anneal_(layer: ConvGMM, score: torch.Tensor) -> torch.Tensor:
    """One ``SingleExp.step(score)`` on the layer's device buffers, in place; refreshes the smoothing factors.

    Args:
        layer: its ``anneal_state`` (5,) float64 = (it, avg, first, last, events), ``eps`` and ``som_sigma``
            () float32 are read and updated; for loss "mc" its ``smoothing`` (2, n, n) is recomputed from the new
            som_sigma (a few tiny ops; no branch on whether it changed).
        score: () the layer's mean score of this step.
    Returns:
        () bool tensor: eps and som_sigma shrank at this step.
    """
    st = layer.anneal_state
    it, avg, first, last, events = st.unbind(0)
    window = float(layer.window)
    zero = torch.zeros_like(avg)
    # add: running mean of the window
    i = torch.remainder(it, window)
    avg = torch.where(i == 0, zero, avg) * i / (i + 1) + score.detach().to(torch.float64) / (i + 1)
    it = it + 1
    # check, at the end of a window
    at_end = torch.remainder(it, window) == window - 1
    r = (avg - last) / (last - first)  # IEEE: x / 0 -> inf or nan -> no change, as numpy
    reduce = at_end & (events >= 2) & (r > -2 * layer.delta) & (r < layer.delta)
    first = torch.where(at_end & (events == 0), avg, first)
    last = torch.where(at_end, avg, last)
    events = torch.where(at_end, events + 1, events)
    st.copy_(torch.stack([it, avg, first, last, events]))
    gamma = _f32(layer.gamma)  # a Python float: the float32 value, multiplied in float64 as SingleExp does
    for buf, floor in ((layer.eps, layer.eps_inf), (layer.som_sigma, layer.som_sigma_inf)):
        shrunk = torch.clamp_min((buf.double() * gamma).float(), _f32(floor))
        buf.copy_(torch.where(reduce, shrunk, buf))
    if layer.loss == "mc":
        layer.smoothing.copy_(smoothing_factors_of(layer.n_components, layer.som_sigma, dtype=layer.smoothing.dtype))
    return reduce
