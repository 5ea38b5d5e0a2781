"""Markdown result pages of the bench scripts: a header with date, command and machine, and the writer."""
from __future__ import annotations

import datetime
import platform
import sys
from typing import List, Optional

import torch


def header(title: str, threads: Optional[int] = None) -> List[str]:
    """Title, date (UTC), the exact command and the machine (CPU, threads, torch)."""
    threads = torch.get_num_threads() if threads is None else threads
    return [
        f"# {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}",
        "",
    ]


def emit(lines: List[str], out: Optional[str]) -> None:
    """Print the page and write it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
