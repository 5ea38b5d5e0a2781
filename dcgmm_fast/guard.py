"""The step guard: divergence caught on the device, reported on the host at a few chosen moments.

Per layer, a device-side record of the first step at which a quantity went bad:
- a GMM layer: its mean score is not finite, or max |mu| or max |pi_logits| exceeds ``PARAM_LIMIT`` (1e4);
- the classifier: its loss is not finite or exceeds ``LOSS_LIMIT`` (1e3; a softmax cross-entropy of 1e3 nats
  means the logits exploded).
Recording is a handful of tensor ops with no host sync (``torch.where`` into small device tensors), so a step
stays free of round trips; the host reads the flags (``check``) at log intervals, before each checkpoint and at
the end of ``fit``, and raises ``DivergenceError`` naming the layer, the step and the quantity. A run stopped
by the guard writes no checkpoint after the flagged step. The CPU eager Trainer, where reading a tensor costs no
sync, checks host values instead (``record_gmm_host``, ``record_classifier_host``: the same record).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

PARAM_LIMIT = 1e4
LOSS_LIMIT = 1e3

_GMM_QUANTITIES = ("mean score is not finite", f"max |mu| exceeds {PARAM_LIMIT:g}",
                   f"max |pi_logits| exceeds {PARAM_LIMIT:g}")
_CLASSIFIER_QUANTITIES = ("loss is not finite", f"loss exceeds {LOSS_LIMIT:g}")


def _abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| in one pass with no temporary (aminmax; NaN propagates). linalg.vector_norm(inf) is 20x slower on
    CPU, abs().amax() writes a copy."""
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo, hi)


class DivergenceError(RuntimeError):
    """Training diverged: the message names the layer, the step and the quantity (and its value)."""


class StepGuard:
    """Device-side divergence flags of a stack's layers.

    Buffers (on ``device``): step () int64, the step being recorded; first_step (L,) int64, -1 while a layer is
    fine; quantity (L,) int64, which check fired; value (L,) float64, the offending value.
    """

    def __init__(self, names: Sequence[str], device: torch.device, classifier: bool = False):
        """names: the layers, bottom-up; classifier: the last one is the linear classifier."""
        self.names = list(names)
        L = len(self.names)
        self.classifier_index = L - 1 if classifier else None
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((L,), -1, dtype=torch.int64, device=device)
        self.quantity = torch.zeros(L, dtype=torch.int64, device=device)
        self.value = torch.zeros(L, dtype=torch.float64, device=device)

    def set_step(self, step: int) -> None:
        self.step.fill_(step)

    def advance(self) -> None:
        self.step.add_(1)

    def _record(self, i: int, values: torch.Tensor, bad: torch.Tensor) -> None:
        """values, bad: (Q,) one entry per quantity; the first bad one is recorded if the layer was fine."""
        new = (self.first_step[i] < 0) & bad.any()
        code = bad.to(torch.int64).argmax()  # the first True
        self.first_step[i] = torch.where(new, self.step, self.first_step[i])
        self.quantity[i] = torch.where(new, code, self.quantity[i])
        picked = values.index_select(0, code.view(1)).squeeze(0)  # a tensor index: no host read
        self.value[i] = torch.where(new, picked.to(torch.float64), self.value[i])

    @torch.no_grad()
    def record_gmm(self, i: int, score: torch.Tensor, mu: torch.Tensor, pi_logits: torch.Tensor,
                   maxima: Optional[torch.Tensor] = None) -> None:
        """A GMM layer's step: its mean score () and parameters after the update; maxima: their (max |mu|,
        max |pi_logits|) (2,) when the update already took them (``train.update_``), else taken here."""
        if maxima is None:
            mu_max, pi_max = (_abs_max(t) for t in (mu, pi_logits))
        else:
            mu_max, pi_max = maxima.unbind()
        values = torch.stack([score.to(mu_max.dtype), mu_max, pi_max])
        # "not <= limit" is also true for NaN
        bad = torch.stack([~torch.isfinite(score), ~(mu_max <= PARAM_LIMIT), ~(pi_max <= PARAM_LIMIT)])
        self._record(i, values, bad)

    @torch.no_grad()
    def record_classifier(self, i: int, loss: torch.Tensor) -> None:
        values = torch.stack([loss, loss])
        bad = torch.stack([~torch.isfinite(loss), ~(loss <= LOSS_LIMIT)])
        self._record(i, values, bad)

    # CPU eager (``Trainer``'s host control): a CPU tensor reads with no sync, so the checks run on host values and
    # the record's tensors are written only when one fires (~40 tiny tensor ops a step fewer); the same record.
    def _record_host(self, i: int, values: Sequence[float], bad: Sequence[bool]) -> None:
        if any(bad) and int(self.first_step[i]) < 0:
            code = list(bad).index(True)
            self.first_step[i] = self.step
            self.quantity[i] = code
            self.value[i] = values[code]

    def record_gmm_host(self, i: int, score: float, mu: torch.Tensor, pi_logits: torch.Tensor,
                        maxima: Optional[torch.Tensor] = None) -> None:
        """``record_gmm`` with the mean score read on the host (and the maxima, taken here when None)."""
        mu_max, pi_max = maxima.tolist() if maxima is not None else (float(_abs_max(t)) for t in (mu, pi_logits))
        self._record_host(i, (score, mu_max, pi_max),
                          (not math.isfinite(score), not mu_max <= PARAM_LIMIT, not pi_max <= PARAM_LIMIT))

    def record_classifier_host(self, i: int, loss: float) -> None:
        """``record_classifier`` with the loss read on the host."""
        self._record_host(i, (loss, loss), (not math.isfinite(loss), not loss <= LOSS_LIMIT))

    def check(self) -> None:
        """Read the flags (one host sync) and raise ``DivergenceError`` for the earliest flagged layer."""
        first = self.first_step.tolist()
        flagged = [(s, i) for i, s in enumerate(first) if s >= 0]
        if not flagged:
            return
        step, i = min(flagged)
        kinds = _CLASSIFIER_QUANTITIES if i == self.classifier_index else _GMM_QUANTITIES
        what = kinds[int(self.quantity[i])]
        raise DivergenceError(
            f"{self.names[i]}: training diverged at step {step}: {what} (value {float(self.value[i]):.4g}); "
            "lower the learning rate (eps0, lambda_*, the classifier's lr) or check the initialisation"
        )
