"""Data-parallel training on ``torch.distributed``: every rank takes the same step.

A ``World`` is the process group a ``Trainer`` trains in. Each rank takes its share (a contiguous slice, in rank
order) of every global batch of the one schedule, computes every layer's gradients on it (each layer's input is
the pre-update output of the one below, so none waits for another's update), and one all-reduce per step
combines them (``World.combine``):
- the gradients (the original rule uses ``torch.autograd.grad``, which DDP does not see) summed in float64 and
  divided by the number of ranks (the shares are equal, so the mean of the ranks' means is the global mean);
- the per-image score sums (``train.image_score_sums``), each rank writing its images' slots of a zeroed global
  vector, so that the sum hands every rank the global batch's sums in image order, bit for bit (adding zeros is
  exact), and the annealing controller sees exactly the single-process mean score.
The classifier's gradients, loss and accuracy ride in the same all-reduce. Every rank then applies the same update
to the same parameters: annealing events happen at the same step on every rank (``check_same`` verifies the
parameters agree at the end of every ``fit``). gloo on CPU, NCCL on GPUs; the process group is PyTorch's own
(``torchrun`` sets it up; ``dcgmm train --nproc N`` runs torchrun, see ``launch``).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class World:
    """The ranks a Trainer trains with (``rank`` of ``size``, on ``group``: None for the default group)."""

    def __init__(self, group: Optional["dist.ProcessGroup"] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("World: torch.distributed is not initialised (init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._buffers: Dict[Tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def current(cls) -> Optional["World"]:
        """The default process group when one with more than one rank is initialised, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls()
        return None

    def share(self, batch_size: int) -> slice:
        """This rank's slice of a global batch of ``batch_size`` images (equal shares, in rank order)."""
        if batch_size % self.size != 0:
            raise ValueError(f"batch_size: the global batch of {batch_size} images does not split evenly over "
                             f"{self.size} processes; give a multiple of {self.size}")
        n = batch_size // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def combine(self, grads: Sequence[torch.Tensor], sums: Sequence[torch.Tensor]
                    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """One all-reduce: the mean over ranks of ``grads`` (summed in float64; written back into the given
        tensors where they are contiguous, and returned) and, for each (n,) float64 vector of per-image sums in
        ``sums``, the global batch's (size * n,) in rank order (each rank writes its slots of a zeroed vector;
        adding zeros is exact). One float64 buffer per layout, reused every step: one converting copy in, the
        all-reduce, one in-place division, one converting copy out."""
        n_grad = sum(g.numel() for g in grads)
        total = n_grad + self.size * sum(v.numel() for v in sums)
        device = grads[0].device if grads else sums[0].device
        key = (total, device)
        flat = self._buffers.get(key)
        if flat is None:
            flat = self._buffers[key] = torch.empty(total, dtype=torch.float64, device=device)
        o = 0
        for g in grads:
            flat[o:o + g.numel()].view_as(g).copy_(g)
            o += g.numel()
        flat[o:].zero_()
        for v in sums:
            n = v.numel()
            flat[o + self.rank * n:o + (self.rank + 1) * n] = v
            o += self.size * n
        dist.all_reduce(flat, group=self.group)
        flat[:n_grad].div_(self.size)
        out, o = [], 0
        for g in grads:
            dst = g if g.is_contiguous() else torch.empty_like(g, memory_format=torch.contiguous_format)
            dst.copy_(flat[o:o + g.numel()].view_as(g))  # autograd's own results (fresh): written in place
            out.append(dst)
            o += g.numel()
        gathered = []
        for v in sums:
            gathered.append(flat[o:o + self.size * v.numel()].clone())
            o += self.size * v.numel()
        return out, gathered

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (e.g. a signal that reached one process)."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")

    def check_same(self, named: Sequence[Tuple[str, torch.Tensor]]) -> None:
        """Raise RuntimeError naming the first tensor whose values differ between ranks (a digest per tensor: its
        float64 sum and the sum of its entries times their index; one all-reduce each for max and min)."""
        digests = []
        for _, t in named:
            v = t.detach().reshape(-1).to(torch.float64)
            w = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device)
            digests += [v.sum(), (v * w).sum()]
        if not digests:
            return
        hi = torch.stack(digests)
        lo = -hi.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=self.group)
        differ = (hi != -lo).view(-1, 2).any(1).tolist()
        for (name, _), bad in zip(named, differ):
            if bad:
                raise RuntimeError(f"{name}: the training processes hold different values (rank {self.rank} of "
                                   f"{self.size}); data-parallel steps must leave every rank with the same "
                                   "parameters")

    def close(self) -> None:
        """Leave the process group (the last call of a rank)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def threads_per_process(processes: int, cores: Optional[int] = None) -> int:
    """max(1, cores // processes): ranks (and their loaders) do not oversubscribe the cores."""
    cores = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


# ---------------------------------------------------------------------------------------------------- processes
def launched_world_size() -> int:
    """WORLD_SIZE as ``torchrun`` sets it for each process it starts (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_world(device: torch.device) -> Optional[World]:
    """In a process started by ``torchrun`` with more than one rank: set this process's threads (see
    ``threads_per_process``), join the default process group (gloo on CPU, NCCL with its own GPU, LOCAL_RANK) and
    return the World; else None."""
    size = launched_world_size()
    if size <= 1:
        return None
    torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", size))))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World()


def local_device(device: torch.device) -> torch.device:
    """A rank's device: ``cuda`` becomes cuda:LOCAL_RANK under torchrun (one GPU per process)."""
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m dcgmm_fast ARGV`` in ``nproc`` processes on this machine through PyTorch's own launcher
    (``python -m torch.distributed.run --standalone --nproc-per-node NPROC -m dcgmm_fast ARGV``, i.e.
    ``torchrun``), each with max(1, cores // nproc) threads; returns its exit status (0 when every rank
    succeeded)."""
    import subprocess
    import sys

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dcgmm_fast", *argv]
    return subprocess.call(cmd, env=env)
