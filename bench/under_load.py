"""Training step time idle and beside a competing busy process: the slow-down under load, cpp beside reference.

    python bench/under_load.py --presets B-class D [--backends cpp reference] [--steps 15] [--out FILE]

Every measurement runs ``step_time.step_ms`` (the eager ``Trainer.train_step`` of a preset at batch 100, 2 torch
threads, median of ``--steps`` steps after warm-up) in a fresh process, first on the idle machine and then while
a competitor runs: a second process doing 2-thread float32 matmuls in a loop (another training, say), started
just before and killed after. Each is measured with the OpenMP wait policy ``dcgmm_fast`` sets when it is
imported before torch (PASSIVE: an idle worker sleeps instead of spinning) and with the spinning default
(``OMP_WAIT_POLICY=ACTIVE``), so the table shows what the policy buys. The slow-down is loaded / idle of the
same configuration, measured in this one run.
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, header  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COMPETITOR = (
    "import torch\n"
    "torch.set_num_threads(2)\n"
    "a = torch.rand(384, 384)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)
MEASURE = (
    "import sys; sys.path.insert(0, {here!r})\n"
    "import dcgmm_fast, torch\n"  # dcgmm_fast first: its wait policy applies
    "torch.set_num_threads(2)\n"
    "from step_time import step_ms\n"
    "print(step_ms({preset!r}, {backend!r}, {steps}, 100))\n"
)


def measure(preset: str, backend: str, steps: int, policy: str, loaded: bool) -> float:
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)
    if policy in ("ACTIVE", "PASSIVE"):
        env["OMP_WAIT_POLICY"] = policy
    elif policy.startswith("SPIN"):  # libgomp: spin this many iterations at a barrier, then sleep
        env["GOMP_SPINCOUNT"] = policy[4:]
    competitor = None
    if loaded:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=dict(os.environ))
        time.sleep(2.0)  # let it reach its loop
    try:
        code = MEASURE.format(here=HERE, preset=preset, backend=backend, steps=steps)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        return float(res.stdout.strip().splitlines()[-1])
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["B-class", "D"])
    parser.add_argument("--backends", nargs="+", default=["cpp", "reference"])
    parser.add_argument("--policies", nargs="+", default=["default", "ACTIVE"],
                        help="default (what dcgmm_fast sets), PASSIVE, ACTIVE, or SPIN<n> (GOMP_SPINCOUNT=n)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = header("Training step idle and under one competing busy process", 2) + [
        "competitor: a 2-thread float32 matmul loop in a second process; batch 100; median ms per step",
        "",
        "| preset | backend | OpenMP wait policy | idle ms | loaded ms | slow-down |",
        "|---|---|---|---|---|---|",
    ]
    for preset in args.presets:
        for backend in args.backends:
            for policy in args.policies:
                steps = args.steps if backend != "reference" else max(5, args.steps // 3)
                idle = measure(preset, backend, steps, policy, loaded=False)
                loaded = measure(preset, backend, steps, policy, loaded=True)
                lines.append(f"| {preset} | {backend} | {policy} | {idle:.1f} | {loaded:.1f} | "
                             f"{loaded / idle:.2f}x |")
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
