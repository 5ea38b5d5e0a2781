"""Callbacks for ``DCGMM.fit(callback=...)`` (called after every step with (step, total_steps, history)): the per-step
log ``dcgmm train`` writes (train_log.jsonl), TensorBoard scalars, several at once.

A log entry (one JSON line of train_log.jsonl, every ``every`` steps and at the last):
    step                 steps done in this run's schedule
    seconds              wall time since the callback was made
    score                {GMM layer: the step's mean score (the layer's training loss; higher is better)}
    som_sigma            {GMM layer: the smoothing width after the step (annealed down to som_sigma_inf)}
    eps                  {GMM layer: the learning rate after the step (annealed from eps0 to eps_inf)}
    classifier_loss      the read-out's cross-entropy on the step's batch (stacks with a classifier)
    classifier_accuracy  its accuracy on that batch
Reading the history costs one device-to-host copy per logged step; between them nothing is read back.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Dict, Optional

CallbackFn = Callable[[int, int, object], None]


def log_entry(model, step: int, seconds: float, history) -> Dict[str, object]:
    """The train_log.jsonl entry of ``step`` (see the module docstring)."""
    entry = {"step": step, "seconds": round(seconds, 3),
             "score": {n: v[-1] for n, v in history.score.items()},
             "som_sigma": {n: v[-1] for n, v in history.som_sigma.items()},
             "eps": {n: float(g.eps) for n, g in model.gmm_layers().items()}}
    if history.classifier_loss:
        entry.update(classifier_loss=history.classifier_loss[-1], classifier_accuracy=history.classifier_accuracy[-1])
    return entry


class _Every:
    def __init__(self, model, every: int):
        if every < 1:
            raise ValueError(f"every: expected >= 1, got {every}")
        self.model, self.every, self.t0 = model, int(every), time.time()

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total


class JsonlLog(_Every):
    """Append train_log.jsonl entries to ``path`` (the format ``dcgmm train`` writes and ``dcgmm show`` plots)."""

    def __init__(self, path: str, model, every: int = 10):
        super().__init__(model, every)
        self.path = path

    def __call__(self, step: int, total: int, history) -> None:
        if self.due(step, total):
            with open(self.path, "a") as f:
                f.write(json.dumps(log_entry(self.model, step, time.time() - self.t0, history)) + "\n")


class TensorBoard(_Every):
    """The log entries as TensorBoard scalars (``score/gmm1``, ``som_sigma/gmm1``, ``eps/gmm1``,
    ``classifier/loss``, ``classifier/accuracy``) under ``log_dir``. Needs ``pip install tensorboard`` (or pass any
    object with ``add_scalar(tag, value, step)`` as ``writer``)."""

    def __init__(self, log_dir: str, model, every: int = 10, writer=None):
        super().__init__(model, every)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("callbacks.TensorBoard needs tensorboard: pip install tensorboard") from None
            writer = SummaryWriter(log_dir)
        self.writer = writer

    def __call__(self, step: int, total: int, history) -> None:
        if not self.due(step, total):
            return
        entry = log_entry(self.model, step, time.time() - self.t0, history)
        for key in ("score", "som_sigma", "eps"):
            for layer, value in entry[key].items():
                self.writer.add_scalar(f"{key}/{layer}", value, step)
        for key in ("classifier_loss", "classifier_accuracy"):
            if key in entry:
                self.writer.add_scalar(f"classifier/{key.split('_')[1]}", entry[key], step)


def chain(*callbacks: Optional[CallbackFn]) -> CallbackFn:
    """One callback calling each given one (None ignored) in order."""
    todo = [c for c in callbacks if c is not None]

    def call(step: int, total: int, history) -> None:
        for c in todo:
            c(step, total, history)

    return call
