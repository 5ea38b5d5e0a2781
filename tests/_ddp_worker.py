"""Run by ``tests/test_distributed.py`` under torchrun (2 processes, gloo): trains ``STACK`` on the shipped
images for 2 epochs (100 steps, annealing events among them) data-parallel, and writes each rank's state to
OUT/rank{R}.pt; rank 0 first trains the same schedule alone, before the process group exists (OUT/single.pt).
``fused`` as a second argument: 1 epoch, each layer's step by the fused step ops (the cpp backend's, which run the
CUDA kernels' arithmetic), so the ranks all-reduce step statistics instead of gradients."""
import os
import sys

import torch
import torch.distributed as dist

from dcgmm_fast import data, presets
from dcgmm_fast.model import DCGMM

#: shared-mode layers (the demo preset before it became preset D's shape). In independent mode every one of the
#: 676 first-layer GMMs sees 100 patches a step and its update is scaled by P = 676: there the float32 rounding
#: of the rank-split sums (1e-7 relative per step) grows to ~3e-5 over the 100 steps (measured), a property of
#: the dynamics, not of the data-parallel machinery this checks.
STACK = [presets.GMM(3, 1, 25, window=5), presets.Pool(), presets.GMM(4, 2, 25, wait=0.1, window=5),
         presets.Classifier("pool1", 0.1)]


def train(fused: bool) -> dict:
    ds = data.load_shipped()
    model = DCGMM(STACK, seed=0, backend="cpp" if fused else "auto")
    model.fit(ds.x_train, ds.y_train, epochs=1 if fused else 2, batch_size=100, seed=0, fused_step=fused or None,
              verbose=False)
    return model.state_dict()


def main(out: str, fused: bool) -> None:
    rank = int(os.environ["RANK"])
    if rank == 0:
        torch.save(train(fused), os.path.join(out, "single.pt"))
    dist.init_process_group("gloo")
    torch.save(train(fused), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "fused")
