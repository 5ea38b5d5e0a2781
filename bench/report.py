"""Markdown result pages of the bench scripts: a header with date, command and machine, and the writer."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from typing import List, Optional

import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo) and the instruction set the C++ kernels run with."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from dcgmm_fast.backends.cpp import cpu_isa

        return f"{name} ({cpu_isa()} kernels)"
    except (ImportError, AttributeError, RuntimeError):
        return name


def header(title: str, threads: Optional[int] = None) -> List[str]:
    """Title, date (UTC), the exact command and the machine (CPU, kernels' instruction set, threads, torch)."""
    threads = torch.get_num_threads() if threads is None else threads
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}",
        "",
    ]


def emit(lines: List[str], out: Optional[str]) -> None:
    """Print the page and write it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
