"""Memory and time of the batched queries over a whole test set, at their default CPU batch size.

    python bench/eval_memory.py [--presets D B-class C E] [--images 10000] [--out FILE]
    python bench/eval_memory.py --checkpoint runD/checkpoint.pt --data fashion_mnist.npz  # a trained model

Every row runs in a fresh process (2 torch threads): a preset's model (random init, seed 0) or ``--checkpoint``'s,
``--images`` test images of its shape (``--data``'s x_test, else the shipped Fashion-MNIST test images; repeated up
to ``--images``; random uniform images for other shapes), then ``DCGMM.evaluate`` (the CLI's per-epoch test
evaluation: per-layer scores and predictions in one pass), ``classify``, ``predict_proba`` and
``predict_components`` one after the other. Per query: its wall time and the growth of the process's resident
memory over the RSS before the first query, at its peak (VmHWM, reset before the query) and after it returns (what
the process keeps). The live data of a batch is at most ``CPU_BATCH_BYTES``
per layer output; growth far above that is the C allocator's heap kept from shrinking.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import emit, header  # noqa: E402

QUERIES = ("evaluate", "classify", "predict_proba", "predict_components")
MEASURE = r"""
import json, time, torch
from dcgmm_fast import data
from dcgmm_fast.model import DCGMM
torch.set_num_threads(2)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

model = DCGMM.load({checkpoint!r}) if {checkpoint!r} else DCGMM({preset!r}, seed=0)
shape = model.input_shape
test = data.load_shipped({data!r} or None).x_test
if tuple(test.shape[1:]) == tuple(shape):
    x = test.repeat(({images} + test.shape[0] - 1) // test.shape[0], 1, 1, 1)[:{images}].contiguous()
else:
    x = torch.rand({images}, *shape, generator=torch.Generator().manual_seed(0))
model.log_prob(x[:8])  # warm-up: first calls of the kernels and their buffers
base = status("VmRSS")
rows = {{}}
for query in {queries!r}:
    if query in ("classify", "predict_proba") and model.classifier is None:
        continue
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    getattr(model, query)(x)
    rows[query] = (time.perf_counter() - t0, status("VmHWM") - base, status("VmRSS") - base,
                   model._batch_size(x, None))
print(json.dumps(rows))
"""


def measure(preset: str, images: int, checkpoint: str = "", data: str = "") -> dict:
    code = MEASURE.format(preset=preset, images=images, queries=QUERIES, checkpoint=checkpoint, data=data)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["D", "B-class", "C", "E"])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--checkpoint", default="", help="a saved model (its preset is the row's label)")
    parser.add_argument("--data", default="", help="an .npz with x_test (default: the shipped images)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.checkpoint:
        args.presets = [os.path.basename(args.checkpoint)]
    lines = header("Batched queries over a test set: time and resident memory", 2) + [
        f"{args.images} images per query, the default CPU batch size; memory as growth over the RSS before the "
        "first query",
        "",
        "| preset | query | batch | seconds | peak RSS growth | RSS growth after |",
        "|---|---|---|---|---|---|",
    ]
    for preset in args.presets:
        for query, (sec, peak, after, batch) in measure(preset, args.images, args.checkpoint, args.data).items():
            lines.append(f"| {preset} | {query} | {batch} | {sec:.2f} | {peak / 2**20:.0f} MiB | "
                         f"{after / 2**20:.0f} MiB |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
