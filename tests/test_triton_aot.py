"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without register spills (no GPU needed).

Runs tools/triton_aot_check.py in a subprocess with the interpreter off (this test session has it on).
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_triton_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "triton_aot_check.py"), "--json",
                          str(tmp_path / "aot.json")], capture_output=True, text=True, env=env, timeout=1200)
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 failed or spilled" in res.stdout
