"""The ``dcgmm`` command: train, sample, inpaint, eval. Parses arguments and calls the library.

    dcgmm train --preset demo --out runs/demo                  # the shipped Fashion-MNIST subset by default
    dcgmm sample --checkpoint runs/demo/checkpoint.pt --out runs/demo
    dcgmm inpaint --checkpoint runs/demo/checkpoint.pt --out runs/demo
    dcgmm eval --checkpoint runs/demo/checkpoint.pt --out runs/demo
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

from . import backends, data, presets
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .guard import DivergenceError
from .metrics import auroc
from .model import DCGMM

DATA_HELP = ("dataset: 'shipped' (5,000 + 1,000 Fashion-MNIST images in the package), an .npz (x_train, y_train, "
             "x_test, y_test; or x, y with --test-fraction), a directory of MNIST-format IDX files (.gz or not), "
             "or torchvision:NAME[:ROOT]")


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an install requirement; without it (e.g. --no-deps installs) no bar
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _epoch_metrics(model: DCGMM, ds: data.Dataset, history, seconds: float) -> dict:
    scores = {k: float(v.mean()) for k, v in model.log_prob(ds.x_test).items()}
    out = {"steps_done": int(model.steps_done), "seconds": round(seconds, 3), "test_layer_scores": scores,
           "som_sigma": {n: float(g.som_sigma) for n, g in model.gmm_layers().items()},
           "eps": {n: float(g.eps) for n, g in model.gmm_layers().items()}}
    if model.classifier is not None:
        out["test_accuracy"] = float((model.classify(ds.x_test) == ds.y_test.to(model.steps_done.device))
                                     .float().mean())
        if history.classifier_accuracy:
            out["train_accuracy_last_steps"] = sum(history.classifier_accuracy[-20:]) / len(
                history.classifier_accuracy[-20:])
    return out


def cmd_train(args) -> int:
    torch.manual_seed(args.seed)
    if args.resume:
        model, plan = load_checkpoint(args.resume, backend=args.backend, map_location=args.device)
        model.to(args.device)
        epochs, batch_size, seed, data_spec = plan["epochs"], plan["batch_size"], plan["seed"], plan["data"]
        test_fraction = plan.get("test_fraction")
        if args.epochs is not None and args.epochs != epochs:
            epochs = args.epochs  # extend (or shorten) the plan
    else:
        preset = presets.get_preset(args.preset)
        epochs = preset.epochs if args.epochs is None else args.epochs
        batch_size, seed, data_spec, test_fraction = args.batch_size, args.seed, args.data, args.test_fraction
        ds0 = data.load_dataset(data_spec, test_fraction=test_fraction)
        model = DCGMM(preset, tuple(ds0.x_train.shape[1:]), ds0.n_classes, backend=args.backend,
                      seed=seed).to(args.device)
    ds = data.load_dataset(data_spec, test_fraction=test_fraction)
    plan = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "data": data_spec,
            "test_fraction": test_fraction, "preset": model.preset.name if model.preset else None}
    os.makedirs(args.out, exist_ok=True)
    per_epoch = ds.x_train.shape[0] // batch_size
    total = int(round(per_epoch * epochs))
    stop = total if args.stop_after is None else min(total, int(round(per_epoch * args.stop_after)))
    metrics_path = os.path.join(args.out, "train_metrics.json")
    log = json.load(open(metrics_path)) if (args.resume and os.path.exists(metrics_path)) else {"epochs": []}
    log.update(plan=plan, command=" ".join(sys.argv))
    bar = _progress(total, int(model.steps_done), f"train {plan['preset'] or 'stack'}")
    t0 = time.time()
    while int(model.steps_done) < stop:
        done = int(model.steps_done)
        epoch_end = min(stop, (done // per_epoch + 1) * per_epoch)

        def tick(step, _total, history):
            if bar is not None:
                post = {n: f"{v[-1]:.2f}" for n, v in history.score.items()}
                post.update({f"som_{n}": f"{float(g.som_sigma):.3f}" for n, g in model.gmm_layers().items()})
                bar.set_postfix(post, refresh=False)
                bar.update(1)

        history = model.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=batch_size, seed=seed, resume=True,
                            stop_step=epoch_end, callback=tick)
        epoch = int(model.steps_done) / per_epoch
        entry = {"epoch": round(epoch, 3), **_epoch_metrics(model, ds, history, time.time() - t0)}
        log["epochs"].append(entry)
        ckpt = os.path.join(args.out, f"checkpoint_epoch{int(round(epoch)):03d}.pt")
        save_checkpoint(ckpt, model, plan)
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, plan)
        json.dump(log, open(metrics_path, "w"), indent=2)
    if bar is not None:
        bar.close()
    final = log["epochs"][-1] if log["epochs"] else {}
    print(json.dumps({"checkpoint": os.path.join(args.out, "checkpoint.pt"), **final}, indent=2))
    return 0


def _load(args) -> DCGMM:
    model, _ = load_checkpoint(args.checkpoint, backend=args.backend, map_location=args.device)
    return model.to(args.device)


def cmd_sample(args) -> int:
    from .images import save_grid

    model = _load(args)
    g = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    written = {}
    images = model.sample(args.n, generator=g)
    cols = max(1, int(round(args.n ** 0.5)))
    written["samples.png"] = save_grid(os.path.join(args.out, "samples.png"), images, cols)
    if model.classifier is not None and not args.no_classes:
        per = args.per_class
        classes = torch.arange(model.n_classes).repeat_interleave(per)
        images = model.sample(classes.numel(), classes=classes.tolist(), generator=g)
        written["samples_by_class.png"] = save_grid(os.path.join(args.out, "samples_by_class.png"), images, per)
    print(json.dumps({k: {"width": w, "height": h} for k, (w, h) in written.items()}))
    return 0


def _mask(kind: str, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    m = torch.ones(h, w, dtype=torch.bool)
    if kind == "right-half":
        m[:, w // 2:] = False
    elif kind == "centre":
        m[h // 4: h - h // 4, w // 4: w - w // 4] = False
    elif kind == "random":
        m = torch.rand(h, w, generator=g) > 0.5
    return m


def cmd_inpaint(args) -> int:
    from .images import save_grid

    model = _load(args)
    ds = data.load_dataset(args.data, test_fraction=args.test_fraction)
    g = torch.Generator().manual_seed(args.seed)
    x = ds.x_test[: args.n].to(args.device)
    H, W = x.shape[1:3]
    mask = _mask(args.mask, H, W, g).to(args.device)
    completed = model.inpaint(x, mask, generator=g)
    masked = torch.where(mask[None, :, :, None], x, torch.full((), 0.5, device=x.device))
    rows = torch.stack([x, masked, completed])  # (3, n, H, W, C): original / masked / completed
    size = save_grid(os.path.join(args.out, "inpaint.png"), rows.reshape(-1, *x.shape[1:]), args.n)
    print(json.dumps({"inpaint.png": {"width": size[0], "height": size[1]}, "mask": args.mask}))
    return 0


def cmd_eval(args) -> int:
    model = _load(args)
    ds = data.load_dataset(args.data, test_fraction=args.test_fraction)
    x, y = ds.x_test.to(args.device), ds.y_test.to(args.device)
    metrics = {"checkpoint": args.checkpoint, "data": args.data,
               "layer_scores": {k: float(v.mean()) for k, v in model.log_prob(x).items()}}
    if model.classifier is not None:
        metrics["test_accuracy"] = float((model.classify(x) == y).float().mean())
    if args.heldout_class is not None:
        scores = model.outlier_scores(x, layer=args.outlier_layer)
        inl, outl = scores[y != args.heldout_class], scores[y == args.heldout_class]
        metrics["outlier_auroc"] = auroc(inl, outl)
        metrics["outlier"] = f"class {args.heldout_class} of the test set vs the other classes"
    if args.outliers is not None:
        other = data.load_dataset(args.outliers, test_fraction=args.test_fraction).x_test.to(args.device)
        metrics["outlier_auroc"] = auroc(model.outlier_scores(x, layer=args.outlier_layer),
                                         model.outlier_scores(other, layer=args.outlier_layer))
        metrics["outlier"] = f"test images of {args.outliers} vs those of {args.data}"
    os.makedirs(args.out, exist_ok=True)
    json.dump(metrics, open(os.path.join(args.out, "metrics.json"), "w"), indent=2)
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcgmm", description="Train, sample, in-paint and evaluate Deep Convolutional GMMs.",
        epilog="Start with: dcgmm train --preset demo --out runs/demo  (a few minutes on 2 CPU cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data_arg=True):
        p.add_argument("--device", default="cpu", help="torch device (cpu, cuda); default cpu")
        p.add_argument("--backend", default="auto", choices=("auto",) + backends.names(),
                       help="ops backend; auto picks the fastest built one")
        p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
        p.add_argument("--out", default="runs/demo", help="output directory")
        if data_arg:
            p.add_argument("--data", default="shipped", help=DATA_HELP)
            p.add_argument("--test-fraction", type=float, default=None, help="test split of an x / y .npz")

    t = sub.add_parser("train", help="train a preset; checkpoints every epoch, metrics JSON, --resume")
    t.add_argument("--preset", default="demo", choices=sorted(presets.PRESETS), help="architecture (default demo)")
    t.add_argument("--epochs", type=float, default=None, help="epochs (default: the preset's)")
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run a checkpoint belongs to (same data, seed and schedule)")
    t.add_argument("--stop-after", type=float, default=None, metavar="EPOCHS",
                   help="stop after this many epochs of the schedule (resume later with --resume)")
    common(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="write samples.png (and samples_by_class.png with a classifier)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--n", type=int, default=64, help="unconditional samples")
    s.add_argument("--per-class", type=int, default=8, help="class-conditional samples per class")
    s.add_argument("--no-classes", action="store_true", help="skip class-conditional samples")
    common(s, data_arg=False)
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("inpaint", help="write inpaint.png: rows original / masked / completed")
    i.add_argument("--checkpoint", required=True)
    i.add_argument("--n", type=int, default=10, help="test images")
    i.add_argument("--mask", default="right-half", choices=["right-half", "centre", "random"])
    common(i)
    i.set_defaults(func=cmd_inpaint)

    e = sub.add_parser("eval", help="write metrics.json: test_accuracy, layer_scores, outlier_auroc")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--heldout-class", type=int, default=None, help="outlier AUROC of this test class vs the rest")
    e.add_argument("--outliers", default=None, help="outlier AUROC of this dataset's test images vs --data's")
    e.add_argument("--outlier-layer", default=None, help="GMM layer whose score is the outlier score (default top)")
    common(e)
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (data.DataError, CheckpointError, ValueError, DivergenceError) as e:
        print(f"dcgmm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
