"""Shared by the examples: a trained demo model on the shipped images (cached under runs/examples/), --quick for
the tests (a few steps)."""
import argparse
import os

from dcgmm_fast import data
from dcgmm_fast.model import DCGMM


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=10.0, help="training epochs of the demo model (10: ~20 s)")
    p.add_argument("--quick", action="store_true", help="a few training steps (what the tests run)")
    p.add_argument("--out", default="runs/examples", help="where the model and pictures go")
    return p


def trained_demo(args):
    """(model, data set): the demo preset trained on the shipped images, cached in --out."""
    ds = data.load_shipped()
    epochs = 0.1 if args.quick else args.epochs
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"demo_e{epochs:g}.pt")
    if os.path.exists(path):
        return DCGMM.load(path), ds
    model = DCGMM("demo", seed=0).fit(ds.x_train, ds.y_train, epochs=epochs, seed=0, verbose=not args.quick)
    model.save(path)
    return model, ds
