"""Every worked example in examples/ runs (--quick: the demo model trained a few steps) and prints its result."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {"inpainting": "MPE", "class_conditional": "requested class", "outliers": "AUROC",
            "marginal": "all-True mask gives the plain score: True"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("examples"))


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs(name, out):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "examples"))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), "--quick", "--out", out],
                         capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert EXAMPLES[name] in res.stdout, res.stdout
