"""Training images/s of one process against N data-parallel processes (torch.distributed), in the same run.

    python bench/ddp_scaling.py --preset D --nproc 1 2 [--steps 40] [--batch 100] [--device cpu] [--out FILE]

For each N: ``torchrun --standalone --nproc-per-node N`` (N = 1: this process's own child, no process group) runs
this file as a worker that trains the preset on the shipped images (every layer training: the steps run at
progress 0.5 of a long schedule), 5 warm-up steps, then ``--steps`` timed steps of the global batch; rank 0 reports
images/s. Each process gets max(1, cores // N) threads (as ``dcgmm train --nproc``). Scaling efficiency =
images/s(N) / (N x images/s(1)). On CPU the processes share the machine's cores: 2 cores set no target.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(preset: str, steps: int, batch: int, device: str) -> None:
    import torch

    from dcgmm_fast import data, distributed
    from dcgmm_fast.model import DCGMM
    from dcgmm_fast.train import History, Trainer

    dev = distributed.local_device(torch.device(device))
    world = distributed.init_world(dev)
    ds = data.load_shipped()
    model = DCGMM(preset, seed=0).to(dev)
    trainer = Trainer(list(model.layers), list(model.names), world=world)
    share = slice(0, batch) if world is None else world.share(batch)
    x, y = ds.x_train.to(dev), ds.y_train.to(dev)
    history = History()

    def step(i):
        lo = (i * batch) % (x.shape[0] - batch)
        trainer.train_step(x[lo:lo + batch][share], y[lo:lo + batch][share], 0.5, history)

    for i in range(5):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(5 + i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if world is None or world.rank == 0:
        print(json.dumps({"images_per_s": steps * batch / seconds, "threads": torch.get_num_threads()}))
    if world is not None:
        world.close()


def run(preset: str, nproc: int, steps: int, batch: int, device: str) -> dict:
    from dcgmm_fast.distributed import threads_per_process

    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_process(nproc)))
    args = [os.path.abspath(__file__), "--worker", "--preset", preset, "--steps", str(steps), "--batch", str(batch),
            "--device", device]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                              if nproc > 1 else []) + args
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{nproc} processes failed:\n{res.stderr[-3000:]}")
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="D")
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.preset, args.steps, args.batch, args.device)
    from report import emit, header

    rows, base = [], None
    for n in args.nproc:
        r = run(args.preset, n, args.steps, args.batch, args.device)
        base = r["images_per_s"] if n == 1 else base
        eff = f"{r['images_per_s'] / (n * base):.2f}" if base else "n/a"
        rows.append(f"| {args.preset} | {args.device} | {n} | {r['threads']} | {args.batch} | "
                    f"{r['images_per_s']:.0f} | {eff} |")
    lines = [*header("data-parallel scaling: training images/s, 1 vs N processes"),
             "| preset | device | processes | threads each | global batch | images/s | scaling efficiency |",
             "|---|---|---|---|---|---|---|", *rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
