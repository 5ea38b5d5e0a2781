"""dcgmm_fast._openmp: the OpenMP wait policy is set before torch loads, and never over the user's choice."""
import os
import subprocess
import sys

import pytest

PROBE = "import os, sys\n{first}\nprint(os.environ.get('OMP_WAIT_POLICY', '<unset>'))\n"


def _policy(first: str, env_policy=None) -> str:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    res = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("first,env_policy,want", [
    ("import dcgmm_fast, torch", None, "PASSIVE"),          # before torch: set
    ("import torch, dcgmm_fast", None, "<unset>"),          # torch first: too late, left alone
    ("import dcgmm_fast, torch", "ACTIVE", "ACTIVE"),       # the user's value wins
])
def test_wait_policy(first, env_policy, want):
    assert _policy(first, env_policy) == want


def test_the_dcgmm_command_runs_with_the_passive_policy():
    """The console script imports dcgmm_fast.cli, i.e. the package, before torch."""
    assert _policy("import dcgmm_fast.cli") == "PASSIVE"
