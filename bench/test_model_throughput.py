"""Model-level throughput of the paper's stacks: training, log_prob, classify and sampling, in images per second.

    python -m pytest bench/test_model_throughput.py        # writes bench/results/model_throughput.md
    DCGMM_BENCH_PRESETS="B-class D" python -m pytest bench/test_model_throughput.py   # a subset

Every preset (A-G, demo, svhn) at batch 100 and 1000, each task on the C++ backend and on the reference in the
same run (the ratio is the speed-up), with the original TF2 code's measured step times as a fixed anchor where
they exist (classifier-B 417 ms, D 387 ms per step of 100 images on the same kind of 2-core machine):
- train: one eager ``Trainer.train_step`` with every layer training (progress 0.5), median over rounds;
- log_prob, classify: ``DCGMM.log_prob`` / ``DCGMM.classify`` of the batch;
- sample: ``DCGMM.sample`` of the batch size, without sharpening (``sharpening=False``: presets D and demo
  sharpen by default) and with 300 sharpening iterations on every GMM (the paper's setting) at batch 100; the
  reference is timed with 30 iterations and its rate per iteration scaled to 300 (said so in the table).
Peak memory: the growth of the process's peak RSS (VmHWM, reset before each row) over its RSS before the row.
Rounds: 7 (2 with sharpening) after a warm-up call for cpp; 1 for the reference (seconds per call).
"""
import os
import time

import pytest
import torch

from dcgmm_fast import ops
from dcgmm_fast.model import DCGMM
from dcgmm_fast.presets import PRESETS, get_preset
from dcgmm_fast.sampling import Sharpening
from dcgmm_fast.train import History, Trainer
from step_time import images  # bench/ is on sys.path under pytest (rootdir conftest)

PRESET_NAMES = os.environ.get("DCGMM_BENCH_PRESETS", "A B B-class C D E F G demo svhn").split()
BATCHES = [100, 1000]
PROVIDERS = ["cpp", "reference"]
SHARPEN_ITERATIONS = 300
REFERENCE_SHARPEN_ITERATIONS = 30


def _reset_peak() -> int:
    """Reset VmHWM (Linux: clear_refs 5) and return the current RSS in bytes (0 where unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        return 0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _images(preset: str, n: int) -> torch.Tensor:
    """n training images of the preset's shape (step_time.images, repeated up to n)."""
    x, _ = images(preset)
    return x.repeat((n + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:n]


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def _task(preset, batch, provider, task):
    """(callable, images per call, note) of one row."""
    model = DCGMM(preset, seed=0, backend=provider)
    x, y = _images(preset, batch), _labels(batch)
    note = ""
    if task == "train":
        trainer = Trainer(list(model.layers), list(model.names))
        history = History()
        has_classifier = any(type(layer).__name__ == "LinearClassifier" for layer in model.layers)

        def run():
            trainer.train_step(x, y if has_classifier else None, 0.5, history)
    elif task == "log_prob":
        def run():
            model.log_prob(x, batch_size=batch)
    elif task == "classify":
        def run():
            model.classify(x, batch_size=batch)
    elif task == "sample":
        def run():
            # sharpening off: presets D and demo sharpen by default (300 iterations), which is the next task's row
            model.sample(batch, sharpening=False, generator=torch.Generator().manual_seed(0))
    else:  # sample+sharpen
        its = SHARPEN_ITERATIONS if provider != "reference" else REFERENCE_SHARPEN_ITERATIONS
        sharpening = Sharpening(iterations=its)
        if its != SHARPEN_ITERATIONS:
            note = f"timed with {its} iterations, scaled to {SHARPEN_ITERATIONS}"

        def run():
            model.sample(batch, sharpening=sharpening, generator=torch.Generator().manual_seed(0))
        return run, batch, note, SHARPEN_ITERATIONS / its
    return run, batch, note, 1.0


def _cases():
    for preset in PRESET_NAMES:
        for batch in BATCHES:
            for task in ("train", "log_prob", "classify", "sample"):
                yield preset, batch, task
        yield preset, 100, "sample+sharpen"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset,batch,task", list(_cases()))
def test_model_throughput(benchmark, record, preset, batch, task, provider):
    if preset not in PRESETS:
        pytest.skip(f"unknown preset {preset}")
    if provider not in ops.available_backends():
        pytest.skip(f"{provider} backend not built")
    if task == "classify" and not any(type(s).__name__ == "Classifier" for s in get_preset(preset).layers):
        pytest.skip("no classifier")
    run, images, note, scale = _task(preset, batch, provider, task)
    if provider != "reference":
        run()  # warm-up (the reference has nothing to warm up and costs seconds per call)
    base = _reset_peak()
    rounds = 1 if provider == "reference" else 2 if task == "sample+sharpen" else 7
    t0 = time.perf_counter()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") - base if base else 0
    seconds = benchmark.stats.stats.median * scale
    record("model_throughput", preset=preset, batch=batch, task=task, provider=provider, seconds=seconds,
           images=images, peak_bytes=max(peak, 0), note=note, wall=wall)
