"""The OpenMP wait policy, set before torch starts its OpenMP runtime (imported first by ``dcgmm_fast``).

By default an OpenMP worker spins at the end of every parallel region, waiting for the next one. A training step
runs dozens of regions, so while another process needs the cores our idle workers burn them: measured with one
competing 2-thread process on 2 cores, a C++ layer's forward + backward went 32 -> 252 ms, and 33 -> 54 ms with
``OMP_WAIT_POLICY=PASSIVE`` (idle speed unchanged; ``bench/under_load.py``). The runtime reads the variable once,
when it loads, i.e. when torch is first imported: so it is set here when torch is not imported yet (the ``dcgmm``
command, or ``import dcgmm_fast`` before ``import torch``), never over a value the user set. Importing torch first
keeps the runtime's default; export ``OMP_WAIT_POLICY=PASSIVE`` then (or ``ACTIVE`` to keep spinning).
"""
import os
import sys


def set_passive_wait_policy() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE if torch is not loaded yet and the user set no policy; True if it was set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


set_passive_wait_policy()
