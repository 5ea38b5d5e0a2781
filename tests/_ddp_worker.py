"""Run by ``tests/test_distributed.py`` under torchrun (2 processes, gloo): trains preset demo on the shipped
images for 2 epochs (100 steps, annealing events among them) data-parallel, and writes each rank's state to
OUT/rank{R}.pt; rank 0 first trains the same schedule alone, before the process group exists (OUT/single.pt)."""
import os
import sys

import torch
import torch.distributed as dist

from dcgmm_fast import data
from dcgmm_fast.model import DCGMM


def train() -> dict:
    ds = data.load_shipped()
    model = DCGMM("demo", seed=0)
    model.fit(ds.x_train, ds.y_train, epochs=2, batch_size=100, seed=0)
    return model.state_dict()


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    if rank == 0:
        torch.save(train(), os.path.join(out, "single.pt"))
    dist.init_process_group("gloo")
    torch.save(train(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
