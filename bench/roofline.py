"""Ceilings of the machine a benchmark runs on, measured in the same run: fp32 FLOP/s (CUDA cores, TF32 off)
and HBM bytes/s on a GPU; sgemm FLOP/s on a CPU."""
from __future__ import annotations

import time

import torch


def _timed(fn, reps: int) -> float:
    """Best wall time of fn over reps calls (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def gpu_ceilings(n: int = 8192, copy_bytes: int = 2**30) -> dict:
    """{'fp32_flops': FLOP/s of an n^3 fp32 matmul without TF32, 'hbm_bytes': bytes/s of a device copy}."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a, b = torch.rand(n, n, device="cuda"), torch.rand(n, n, device="cuda")
        flops = 2 * n**3 / _timed(lambda: torch.mm(a, b), 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    src = torch.empty(copy_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    hbm = 2 * copy_bytes / _timed(lambda: dst.copy_(src), 10)  # read + write
    return {"fp32_flops": flops, "hbm_bytes": hbm}


def cpu_sgemm_flops(n: int = 2048) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    return 2 * n**3 / _timed(lambda: torch.mm(a, b), 5)
