"""The ``dcgmm`` command: train, sample, inpaint, eval. Parses arguments and calls the library.

    dcgmm train --preset demo --out runs/demo                  # the shipped Fashion-MNIST subset by default
    dcgmm sample --checkpoint runs/demo/checkpoint.pt --out runs/demo
    dcgmm inpaint --checkpoint runs/demo/checkpoint.pt --out runs/demo
    dcgmm eval --checkpoint runs/demo/checkpoint.pt --out runs/demo
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

import torch

from . import backends, data, distributed, presets
from .atomic import atomic_open, remove_stale_temporaries, write_json
from .backends import BackendNotAvailable
from .callbacks import log_entry
from .checkpoint import (CheckpointError, load_checkpoint, load_stack, model_from_config, save_checkpoint,
                         specs_from_config)
from .guard import DivergenceError
from .metrics import auroc, original_auc
from .model import DCGMM
from .schedule import Schedule
from .sampling import Sharpening, check_guidance
from .sources import ArrayImages, convert_npz

#: train_log.jsonl gets a line every this many steps (and at the last step)
LOG_EVERY = 10
DATA_HELP = ("dataset: 'shipped' (5,000 + 1,000 Fashion-MNIST images in the package), an .npz (x_train, y_train, "
             "x_test, y_test; or x, y with --test-fraction), a directory of MNIST-format IDX files (.gz or not), "
             "or torchvision:NAME[:ROOT]")


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an install requirement; without it (e.g. --no-deps installs) no bar
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _test_scores(model: DCGMM, ds: data.Dataset):
    """(per-layer mean test scores, test accuracy or None): a streamed test set in batches of 1,000."""
    parts = [model.evaluate(b[0]) for b in ds.x_test.batches(1000)] if isinstance(ds.x_test, ArrayImages) \
        else [model.evaluate(ds.x_test)]
    scores = {k: float(torch.cat([p[0][k] for p in parts]).mean()) for k in parts[0][0]}
    pred = torch.cat([p[1] for p in parts]).cpu() if model.classifier is not None else None
    return scores, None if pred is None else float((pred == ds.y_test.cpu()).float().mean())


def _epoch_metrics(model: DCGMM, ds: data.Dataset, history, seconds: float) -> dict:
    scores, accuracy = _test_scores(model, ds)
    out = {"steps_done": int(model.steps_done), "seconds": round(seconds, 3), "test_layer_scores": scores,
           "som_sigma": {n: float(g.som_sigma) for n, g in model.gmm_layers().items()},
           "eps": {n: float(g.eps) for n, g in model.gmm_layers().items()}}
    if model.classifier is not None:
        out["test_accuracy"] = accuracy
        if history.classifier_accuracy:
            out["train_accuracy_last_steps"] = sum(history.classifier_accuracy[-20:]) / len(
                history.classifier_accuracy[-20:])
    return out


class _Interrupt:
    """SIGINT / SIGTERM during training: finish the current step, then stop (``should_stop``)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _settings(items: List[str]) -> Dict[str, object]:
    """--set KEY=VALUE items -> {key: parsed value} (``presets.parse_value``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE (e.g. gmm2.n_components=64), got {item!r}")
        out[key.strip()] = presets.parse_value(value.strip())
    return out


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {device!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} asked for, but no CUDA device is available here "
                         f"(torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:N], got {device!r}")
    return dev


def _writable_dir(path: str, arg: str = "--out") -> str:
    """Create ``path`` if needed and prove it writable now, before any work (not at the first save)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{arg}: {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dcgmm-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{arg}: cannot write into {path} ({e.strerror or e})") from None
    return path


def _positive(name: str, value, integer: bool = False) -> None:
    if value is None:
        return
    if not (value > 0 and math.isfinite(value)) or (integer and int(value) != value):
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: expected {kind}, got {value}")


def _read_log(path: str, max_step: int) -> List[str]:
    """train_log.jsonl's complete lines up to ``max_step`` (a kill may have cut the last line)."""
    if not os.path.exists(path):
        return []
    keep = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= max_step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return keep


def cmd_train(args) -> int:
    """Train (or resume); checkpoints (atomic, named by step) at every epoch end, at --stop-after and on
    SIGINT / SIGTERM; train_metrics.json (one document) and train_log.jsonl (one line per logged step).
    Under torchrun (``--nproc``) every rank trains its share of each global batch and rank 0 alone writes."""
    device = distributed.local_device(_check_device(args.device))
    world = distributed.init_world(device)
    try:
        return _train(args, device, world)
    finally:
        if world is not None:
            world.close()


def _train(args, device: torch.device, world) -> int:
    main = world is None or world.rank == 0
    rank, size = (0, 1) if world is None else (world.rank, world.size)
    _positive("--memory-budget", args.memory_budget)
    budget = int(args.memory_budget * 2**20) if args.memory_budget is not None else _default_budget()
    for name in ("epochs", "stop_after"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--batch-size", args.batch_size, integer=True)
    if args.resume:
        if args.settings:
            raise ValueError("--set: a resumed run keeps its checkpoint's architecture and settings")
        model, plan = load_checkpoint(args.resume, backend=args.backend, map_location=device)
        model.to(device)
        for key in ("epochs", "batch_size", "seed", "data"):
            if key not in plan:
                raise CheckpointError(f"{args.resume}: no training plan ({key!r} missing): not a checkpoint of "
                                      "`dcgmm train`; train anew instead")
        _positive(f"{args.resume}: batch_size", plan["batch_size"], integer=True)
        given = {"preset": args.preset, "data": args.data, "batch_size": args.batch_size, "seed": args.seed,
                 "test_fraction": args.test_fraction}
        ignored = [f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None and v != plan.get(k)]
        if ignored:
            print(f"dcgmm train: resuming {args.resume} with its own settings; ignored: {', '.join(ignored)}",
                  file=sys.stderr)
        epochs = plan["epochs"] if args.epochs is None else args.epochs  # --epochs extends (or shortens) the plan
        batch_size, seed, data_spec = plan["batch_size"], plan["seed"], plan["data"]
        reshuffle, classes = bool(plan.get("reshuffle", False)), plan.get("classes")
        test_fraction = plan.get("test_fraction")
        out = args.out or os.path.dirname(os.path.abspath(args.resume))
        ds = data.load_dataset(data_spec, test_fraction=test_fraction, memory_budget=budget,
                               image_shape=model.input_shape, skip_broken=args.skip_broken)
    else:
        if args.stack is not None and args.preset is not None:
            raise ValueError("--stack, --preset: give one architecture, not both")
        stack = load_stack(args.stack) if args.stack is not None else None
        preset = presets.get_preset(args.preset or "demo") if stack is None else None
        settings = _settings(args.settings)
        if settings and stack is not None:
            stack = dict(stack, layers=[{"kind": type(sp).__name__, **dataclasses.asdict(sp)}
                                        for sp in presets.override(specs_from_config(stack), settings)])
        elif settings:
            preset = presets.override(preset, settings)
        if settings:  # the layers' own checks (e.g. a perfect square K for mc), named as the user's --set
            try:
                if stack is not None:
                    model_from_config(stack)
                else:
                    DCGMM(preset)
            except (ValueError, TypeError) as e:
                raise ValueError(f"--set {' '.join(args.settings)}: {e}") from None
        input_shape = preset.input_shape if stack is None else tuple(stack["input_shape"])
        epochs = (preset.epochs if preset else 10) if args.epochs is None else args.epochs
        batch_size = 100 if args.batch_size is None else args.batch_size
        seed = 0 if args.seed is None else args.seed
        reshuffle, classes = args.reshuffle, _class_list(args.classes)
        data_spec, test_fraction = args.data or "shipped", args.test_fraction
        out = args.out or "runs/demo"
        ds = data.load_dataset(data_spec, test_fraction=test_fraction, memory_budget=budget,
                               image_shape=input_shape, skip_broken=args.skip_broken)
        shape = tuple(ds.x_train.shape[1:])
        if stack is not None:
            if shape != input_shape:
                raise ValueError(f"{data_spec}: images of shape (H, W, C) = {shape} do not fit the stack's input_shape "
                                 f"{list(input_shape)} ({args.stack})")
            model = model_from_config({**stack, "n_classes": max(stack["n_classes"], ds.n_classes)},
                                      backend=args.backend, seed=seed).to(device)
        else:
            try:
                model = DCGMM(preset, shape, ds.n_classes, backend=args.backend, seed=seed).to(device)
            except ValueError as e:  # e.g. channels-first images read as (H, W, C) = (1, 28, 28)
                raise ValueError(f"{data_spec}: images of shape (H, W, C) = {shape} do not fit preset {preset.name} "
                                 f"({e}); the loaders expect (N, H, W) or (N, H, W, C) images") from None
    torch.manual_seed(seed)
    if classes is not None:
        ds = _only_classes(ds, classes, data_spec)
    n_train = len(ds.x_train)
    streamed = isinstance(ds.x_train, ArrayImages)
    per_epoch = n_train // batch_size
    if per_epoch < 1:
        raise ValueError(f"--batch-size: {batch_size} is larger than the {n_train} training images of {data_spec}")
    total = int(round(per_epoch * epochs))
    stop = total if args.stop_after is None else min(total, int(round(per_epoch * args.stop_after)))
    done = int(model.steps_done)
    if stop <= done:
        what = (f"the checkpoint has done {done} of {total} steps" if args.resume
                else f"--epochs {epochs} x {per_epoch} steps per epoch rounds to {stop} steps")
        hint = "; give a larger --epochs to extend it" if args.resume else ""
        raise ValueError(f"nothing to train: {what}{hint}")
    if world is not None:
        world.share(batch_size)  # a global batch that does not split evenly: the error, on every rank, now
    if main:
        _writable_dir(out)
        remove_stale_temporaries(out, ("checkpoint", "train_metrics.json.", "train_log.jsonl."))  # a kill's leftovers
    plan = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "data": data_spec,
            "test_fraction": test_fraction, "preset": model.preset.name if model.preset else None,
            "reshuffle": reshuffle, "classes": classes,
            "class_names": list(ds.class_names) if ds.class_names else (plan.get("class_names") if args.resume
                                                                         else None),
            "seconds": float(plan.get("seconds", 0.0)) if args.resume else 0.0,
            "processes": 1 if world is None else world.size}
    metrics_path, log_path = os.path.join(out, "train_metrics.json"), os.path.join(out, "train_log.jsonl")
    log = {"epochs": []}
    if main and args.resume and os.path.exists(metrics_path):
        try:
            log = json.load(open(metrics_path))
        except ValueError:
            print(f"dcgmm train: {metrics_path} is unreadable; starting a new one", file=sys.stderr)
        log["epochs"] = [e for e in log.get("epochs", []) if e.get("steps_done", 0) <= done]
    if main:
        lines = _read_log(log_path, done) if args.resume else []
        with atomic_open(log_path, "w") as f:  # the log as of the checkpoint's step
            f.writelines(lines)
    log.update(plan=plan, command=" ".join(sys.argv))
    bar = _progress(total, done, f"train {plan['preset'] or 'stack'}") if main else None
    t0 = time.time() - plan["seconds"]
    log_file = open(log_path, "a") if main else None

    def tick(step, _total, history):
        if bar is not None:
            bar.update(1)
        if log_file is None or (step % LOG_EVERY != 0 and step != stop):
            return  # the history stays on the device between log lines (no per-step host read)
        if bar is not None:
            post = {n: f"{v[-1]:.2f}" for n, v in history.score.items()}
            post.update({f"som_{n}": f"{v[-1]:.3f}" for n, v in history.som_sigma.items()})
            bar.set_postfix(post, refresh=False)
        entry = log_entry(model, step, time.time() - t0, history)  # format: dcgmm_fast/callbacks.py
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()

    checkpoint = os.path.join(out, "checkpoint.pt")
    stopping = [False]  # agreed by every rank after each step: they stop at the same step

    def should_stop() -> bool:
        stopping[0] = interrupted() if world is None else world.any(interrupted())
        return stopping[0]

    try:
        with _Interrupt() as interrupted:
            while int(model.steps_done) < stop and not stopping[0]:
                done = int(model.steps_done)
                epoch_end = min(stop, (done // per_epoch + 1) * per_epoch)
                if streamed:  # memory-mapped: a DataLoader reads each step's batch of the same schedule
                    loader = ds.x_train.loader(Schedule(n_train, batch_size, seed, reshuffle=reshuffle, rank=rank,
                                                        world_size=size),
                                               pin_memory=device.type == "cuda")
                    history = model.fit(loader, epochs=epochs, resume=True, stop_step=epoch_end, callback=tick,
                                        should_stop=should_stop, world=world, verbose=False).history_
                else:
                    history = model.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=batch_size, seed=seed,
                                        reshuffle=reshuffle, resume=True, stop_step=epoch_end, callback=tick,
                                        should_stop=should_stop, world=world, verbose=False).history_
                if not main:
                    continue  # rank 0 evaluates and writes; the others wait for it at the next step's all-reduce
                steps = int(model.steps_done)
                plan["seconds"] = round(time.time() - t0, 3)
                entry = {"epoch": round(steps / per_epoch, 4), **_epoch_metrics(model, ds, history, plan["seconds"])}
                log["epochs"].append(entry)
                save_checkpoint(os.path.join(out, f"checkpoint_step{steps:07d}.pt"), model, plan)
                save_checkpoint(checkpoint, model, plan)
                write_json(metrics_path, log, indent=2)
    finally:
        if log_file is not None:
            log_file.close()
        if bar is not None:
            bar.close()
    if interrupted.signal is not None or stopping[0]:
        if main:
            name = signal.Signals(interrupted.signal).name if interrupted.signal is not None else "another rank"
            print(f"dcgmm train: stopped by {name} after step {int(model.steps_done)} of {total}; checkpoint "
                  f"{checkpoint}; continue with: dcgmm train --resume {checkpoint}", file=sys.stderr)
        return 130
    if main:
        final = log["epochs"][-1] if log["epochs"] else {}
        print(json.dumps({"checkpoint": checkpoint, **final}, indent=2))
    return 0


def _launch_train(args, argv: List[str]) -> int:
    """``dcgmm train --nproc N ...``: the same command in N processes under torchrun (``distributed.launch``)."""
    _positive("--nproc", args.nproc, integer=True)
    if args.batch_size is not None and args.batch_size % args.nproc != 0:
        raise ValueError(f"--batch-size: the global batch of {args.batch_size} images does not split evenly over "
                         f"--nproc {args.nproc} processes")
    rest, skip = [], False
    for a in argv:  # the ranks run the same command without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    status = distributed.launch(args.nproc, rest)
    if status != 0:
        print(f"dcgmm train: a training process failed (exit status {status}); its error is printed above",
              file=sys.stderr)
    return status


def _class_list(spec: Optional[str]) -> Optional[List[int]]:
    """"1-9" / "0,2,4-6" -> sorted class ids (None: all)."""
    if spec is None:
        return None
    out = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi if hi else lo) + 1))
    except ValueError:
        raise ValueError(f"--classes: expected class ids and ranges like 1-9 or 0,2,4-6, got {spec!r}") from None
    if not out or min(out) < 0:
        raise ValueError(f"--classes: expected non-negative class ids, got {spec!r}")
    return sorted(out)


def _only_classes(ds: data.Dataset, classes: List[int], spec: str) -> data.Dataset:
    """The train and test images of ``classes`` only (the classifier keeps every class's output)."""
    if max(classes) >= ds.n_classes:
        raise ValueError(f"--classes: {spec} has classes 0..{ds.n_classes - 1}, got {classes}")
    keep = torch.tensor(classes)

    def part(x, y):
        mask = torch.isin(y, keep)
        if not bool(mask.any()):
            raise ValueError(f"--classes: {spec} holds no images of classes {classes}")
        return (x.subset(mask.numpy()) if isinstance(x, ArrayImages) else x[mask]), y[mask]

    (xt, yt), (xs, ys) = part(ds.x_train, ds.y_train), part(ds.x_test, ds.y_test)
    return data.Dataset(xt, yt, xs, ys, ds.n_classes, ds.class_names)


def _load(args):
    """(model, training plan). Checks --device and --out first (a device error is not a checkpoint error)."""
    _check_device(args.device)
    for name in ("n", "per_class"):
        if hasattr(args, name):
            _positive(f"--{name.replace('_', '-')}", getattr(args, name), integer=True)
    _writable_dir(args.out)
    model, plan = load_checkpoint(args.checkpoint, backend=args.backend, map_location=args.device)
    return model.to(args.device), plan


def cmd_sample(args) -> int:
    from .images import save_grid

    model, plan = _load(args)
    g = torch.Generator().manual_seed(args.seed)
    settings = {"top_s": args.top_s, "divisor": args.divisor, "sharpening": _sharpening(args.sharpen, model)}
    _positive("--top-s", args.top_s, integer=True)
    _positive("--divisor", args.divisor)
    guidance = {} if args.guidance is None else {"guidance": _guidance(args.guidance)}
    starts = [n for n in model.names if n != "classifier"]
    if args.layer is not None and args.layer not in starts:
        raise ValueError(f"--layer: expected one of {starts}, got {args.layer!r}")
    written = {}
    images = model.sample(args.n, layer=args.layer, generator=g, **settings)
    cols = max(1, int(round(args.n ** 0.5)))
    written["samples.png"] = save_grid(os.path.join(args.out, "samples.png"), images, cols)
    if model.classifier is not None and not args.no_classes:
        per = args.per_class
        classes = torch.arange(model.n_classes).repeat_interleave(per)
        images = model.sample(classes.numel(), classes=classes.tolist(), generator=g, **settings, **guidance)
        names = plan.get("class_names") or []
        labels = [f"{k} {names[k]}" if k < len(names) else f"class {k}" for k in range(model.n_classes)]
        written["samples_by_class.png"] = save_grid(os.path.join(args.out, "samples_by_class.png"), images, per,
                                                    row_labels=labels)
    print(json.dumps({k: {"width": w, "height": h} for k, (w, h) in written.items()}))
    return 0


def cmd_show(args) -> int:
    """prototypes_<GMM>.png for every GMM layer and, from train_log.jsonl next to the checkpoint (or --log),
    curves.png."""
    from .images import save_grid
    from .png import save_png
    from .show import plot_curves, prototypes, read_log

    model, _ = _load(args)
    written = {}
    for name in model.gmm_layers():
        images = prototypes(model, name)
        path = os.path.join(args.out, f"prototypes_{name}.png")
        scale = max(1, 56 // max(images.shape[1], images.shape[2]))
        written[os.path.basename(path)] = save_grid(path, images, max(1, int(round(images.shape[0] ** 0.5))),
                                                    scale=scale)
    log_path = args.log or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "train_log.jsonl")
    if os.path.exists(log_path):
        try:
            picture = plot_curves(read_log(log_path))
        except ImportError:
            raise data.DataError("dcgmm show: drawing curves.png needs Pillow (pip install pillow); the "
                                 "prototypes were written") from None
        with atomic_open(os.path.join(args.out, "curves.png"), "wb") as f:
            save_png(f, picture)
        written["curves.png"] = (picture.shape[1], picture.shape[0])
    elif args.log:
        raise ValueError(f"--log: {args.log}: no such file")
    print(json.dumps({k: {"width": w, "height": h} for k, (w, h) in written.items()}))
    return 0


def _sharpening(spec: Optional[str], model: DCGMM):
    """--sharpen "ITERATIONS:RATE" (every GMM) or "LAYER=ITERATIONS:RATE,..." -> a dict by GMM name (spec 3.3;
    the paper sharpens 300 iterations); "off" -> False; None without the flag (each layer's own default)."""
    if spec is None:
        return None
    if spec.strip().lower() in ("off", "none", "0"):
        return False
    gmms = list(model.gmm_layers())
    out = {}
    for part in spec.split(","):
        name, _, value = part.strip().rpartition("=")
        try:
            iterations, rate = value.split(":")
            sharp = Sharpening(rate=float(rate), iterations=int(iterations))
        except ValueError:
            raise ValueError(f"--sharpen: expected ITERATIONS:RATE or LAYER=ITERATIONS:RATE,..., "
                             f"got {spec!r}") from None
        if sharp.iterations < 0 or not (sharp.rate > 0 and math.isfinite(sharp.rate)):
            raise ValueError(f"--sharpen: expected iterations >= 0 and a positive rate, got {part.strip()!r}")
        if name and name not in gmms:
            raise ValueError(f"--sharpen: {name!r} is not a GMM layer of this model ({', '.join(gmms)})")
        for n in ([name] if name else gmms):
            out[n] = sharp
    return out


def _guidance(value: str) -> Optional[float]:
    """--guidance G (a number >= 0) or "off" (the original's class prior, spec 3.2)."""
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return check_guidance(value)
    except ValueError:
        raise ValueError(f"--guidance: expected a number >= 0 or 'off', got {value!r}") from None


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

    model, plan = _load(args)
    ds = data.load_dataset(args.data, test_fraction=args.test_fraction)
    g = torch.Generator().manual_seed(args.seed)
    x = ds.x_test[: args.n].to(args.device)
    H, W = x.shape[1:3]
    mask = _mask(args.mask, H, W, g).to(args.device)
    completed = model.inpaint(x, mask, mode=args.mode, generator=g)
    masked = torch.where(mask[None, :, :, None], x, torch.full((), 0.5, device=x.device))
    rows = torch.stack([x, masked, completed])  # (3, n, H, W, C): original / masked / completed
    size = save_grid(os.path.join(args.out, "inpaint.png"), rows.reshape(-1, *x.shape[1:]), args.n)
    print(json.dumps({"inpaint.png": {"width": size[0], "height": size[1]}, "mask": args.mask, "mode": args.mode}))
    return 0


def cmd_eval(args) -> int:
    model, plan = _load(args)
    ds = data.load_dataset(args.data, test_fraction=args.test_fraction)
    x, y = ds.x_test.to(args.device), ds.y_test.to(args.device)
    scores, accuracy = _test_scores(model, ds)  # one forward for both
    metrics = {"checkpoint": args.checkpoint, "data": args.data, "layer_scores": scores}
    if model.classifier is not None:
        metrics["test_accuracy"] = accuracy
    if args.heldout_class is not None:
        trained = plan.get("classes") if "data" in plan else "unknown"
        if trained is None or (trained != "unknown" and args.heldout_class in trained):
            raise ValueError(f"--heldout-class: the model was trained on class {args.heldout_class} "
                             f"({'every class' if trained is None else 'classes ' + str(trained)}), so its AUROC "
                             "measures no outlier detection; train without it, e.g. dcgmm train --classes 1-9")
        scores = model.outlier_scores(x, layer=args.outlier_layer)
        inl, outl = scores[y != args.heldout_class], scores[y == args.heldout_class]
        if trained != "unknown":
            inl = scores[torch.isin(y, torch.tensor(trained, device=y.device))]
        metrics["outlier_auroc"] = auroc(inl, outl)
        metrics["outlier_auc_original"] = original_auc(inl, outl)
        metrics["outlier"] = (f"class {args.heldout_class} of the test set vs the "
                              + ("other classes" if trained == "unknown" else f"trained classes {trained}")
                              + ("; training classes unknown (a checkpoint without a training plan)"
                                 if trained == "unknown" else ""))
    if args.outliers is not None:
        other = data.load_dataset(args.outliers, test_fraction=args.test_fraction).x_test.to(args.device)
        inl, outl = (model.outlier_scores(v, layer=args.outlier_layer) for v in (x, other))
        metrics["outlier_auroc"] = auroc(inl, outl)
        metrics["outlier_auc_original"] = original_auc(inl, outl)
        metrics["outlier"] = f"test images of {args.outliers} vs those of {args.data}"
    write_json(os.path.join(args.out, "metrics.json"), metrics, indent=2)
    print(json.dumps(metrics, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcgmm", description="Train, sample, in-paint and evaluate Deep Convolutional GMMs.",
        epilog="Start with: dcgmm train --preset demo --out runs/demo  (a few minutes on 2 CPU cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data_arg=True, train=False):
        # train: None marks "not given", so --resume can tell which flags disagree with the checkpoint
        p.add_argument("--device", default="auto",
                       help="torch device: auto (CUDA when present, else CPU; the default), cpu, cuda[:N]")
        p.add_argument("--backend", default="auto", choices=("auto",) + backends.names(),
                       help="ops backend; auto picks the fastest built one")
        p.add_argument("--seed", type=int, default=None if train else 0, help="seed of every random draw (0)")
        p.add_argument("--out", default=None if train else "runs/demo",
                       help="output directory (train: runs/demo, or the resumed checkpoint's folder)")
        if data_arg:
            p.add_argument("--data", default=None if train else "shipped", help=DATA_HELP)
            p.add_argument("--test-fraction", type=float, default=None, help="test split of an x / y .npz")

    t = sub.add_parser("train", help="train a preset; checkpoints every epoch, metrics JSON, --resume")
    t.add_argument("--preset", default=None, choices=sorted(presets.PRESETS), help="architecture (default demo)")
    t.add_argument("--stack", default=None, metavar="JSON",
                   help="an architecture of your own: a JSON file in the checkpoint's format (layers, input_shape, "
                        "n_classes; see checkpoint.load_stack)")
    t.add_argument("--epochs", type=float, default=None, help="epochs (default: the preset's)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="override a field of the preset or stack (repeatable): LAYER.FIELD=VALUE "
                        "(gmm2.n_components=64, classifier.lr=0.05), gmm.FIELD=VALUE for every GMM "
                        "(gmm.sigma_min=0.05, gmm.init=kmeans++), or epochs / batch_size; stored in the checkpoint")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default 100)")
    t.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue the run a checkpoint belongs to (same data, seed and schedule)")
    t.add_argument("--stop-after", type=float, default=None, metavar="EPOCHS",
                   help="stop after this many epochs of the schedule (resume later with --resume)")
    t.add_argument("--classes", default=None, metavar="LIST",
                   help="train (and report test metrics) on these classes only, e.g. 1-9 or 0,2,4-6: the outlier "
                        "experiment trains on 1-9 and scores class 0 (dcgmm eval --heldout-class 0)")
    t.add_argument("--reshuffle", action="store_true",
                   help="a new seeded order every epoch (default: the original's one shuffle for every epoch)")
    t.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                   help="data larger than this (MiB; default a quarter of this machine's memory) stream from "
                        "memory-mapped files (.npy, uncompressed .npz) instead of being loaded")
    t.add_argument("--skip-broken", action="store_true",
                   help="image folders: skip unreadable image files with a warning (default: an error)")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; gloo on CPU, one GPU each with "
                        "--device cuda); --batch-size stays the global batch and must split evenly")
    common(t, train=True)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="write samples.png (and samples_by_class.png with a classifier)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--n", type=int, default=64, help="unconditional samples")
    s.add_argument("--per-class", type=int, default=8, help="class-conditional samples per class")
    s.add_argument("--no-classes", action="store_true", help="skip class-conditional samples")
    s.add_argument("--sharpen", default=None, metavar="SPEC",
                   help="sharpening (spec 3.3): ITERATIONS:RATE for every GMM, or LAYER=ITERATIONS:RATE,... "
                        "(e.g. gmm1=300:0.1; RATE per image, the original's / 100), or 'off'; default: the "
                        "preset's (e.g. D: gmm1 and gmm2 300:0.1)")
    s.add_argument("--guidance", default=None, metavar="G",
                   help="class-conditional samples: weight of the classifier's class prior against the model's own "
                        "top-down sample (default 3, see DCGMM.sample), or 'off' for the original's prior (spec 3.2)")
    s.add_argument("--top-s", type=int, default=None, help="components kept per position (default: each layer's)")
    s.add_argument("--divisor", type=float, default=None, help="noise divisor (default: each layer's)")
    s.add_argument("--layer", default=None, help="unconditional samples start at this GMM or pool (default: the top "
                                                 "GMM)")
    common(s, data_arg=False)
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("inpaint", help="write inpaint.png: rows original / masked / completed")
    i.add_argument("--checkpoint", required=True)
    i.add_argument("--n", type=int, default=10, help="test images")
    i.add_argument("--mask", default="right-half", choices=["right-half", "centre", "random"])
    i.add_argument("--mode", default="sample", choices=["sample", "mpe"],
                   help="sample: variants (spec 3.4); mpe: the most probable completion, deterministic")
    common(i)
    i.set_defaults(func=cmd_inpaint)

    v = sub.add_parser("show", help="write each GMM layer's prototypes and the training curves as PNGs")
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--log", default=None, help="a train_log.jsonl (default: the one next to the checkpoint)")
    common(v, data_arg=False)
    v.set_defaults(func=cmd_show)

    c = sub.add_parser("convert", help="write an uncompressed copy of an .npz (so it can be memory-mapped)")
    c.add_argument("src", help="an .npz (compressed or not)")
    c.add_argument("dst", help="the uncompressed .npz to write")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("eval", help="write metrics.json: test_accuracy, layer_scores, outlier_auroc")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--heldout-class", type=int, default=None, help="outlier AUROC of this test class vs the rest")
    e.add_argument("--outliers", default=None, help="outlier AUROC of this dataset's test images vs --data's")
    e.add_argument("--outlier-layer", default=None, help="GMM layer whose score is the outlier score (default top)")
    common(e)
    e.set_defaults(func=cmd_eval)
    return parser


ANTICIPATED = (data.DataError, CheckpointError, ValueError, TypeError, DivergenceError, BackendNotAvailable, OSError)


def cmd_convert(args) -> int:
    convert_npz(args.src, args.dst)
    print(json.dumps({"written": args.dst, "bytes": os.path.getsize(args.dst)}))
    return 0


def _default_budget() -> int:
    """A quarter of this machine's physical memory (bytes)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def _rank_tag() -> str:
    """" (rank R of N)" in a process started by torchrun with more than one rank, else ""."""
    size = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {size})" if size not in ("", "1") else ""


def main(argv: Optional[List[str]] = None) -> int:
    """Anticipated failures print ``dcgmm CMD: error: <what>: <problem>`` and exit 2; anything else prints its
    traceback and asks to be reported (exit 1)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "device", None) == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.command == "train" and args.nproc != 1 and distributed.launched_world_size() == 1:
            return _launch_train(args, sys.argv[1:] if argv is None else list(argv))
        return args.func(args)
    except KeyboardInterrupt:
        print(f"dcgmm {args.command}: interrupted", file=sys.stderr)
        return 130
    except ANTICIPATED as e:
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"dcgmm {args.command}{_rank_tag()}: error: {what}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - unexpected: show everything and ask for a report
        traceback.print_exc()
        print(f"dcgmm {args.command}: unexpected error; please report it with the command line and the traceback "
              "above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
