"""The paper's experiments (spec section 4) on Fashion-MNIST, or any data in its layout: one command each.

    python experiments/run.py NAME [--data PATH] [--seed 0] [--out experiments/results] [--quick]

NAME: classifier-B, training-dynamics, sampling, sampling-C, class-conditional, inpainting, variants, outliers,
flat-gmm, tied-init, or all. Each writes OUT/NAME/metrics.json (numbers, the exact command, seed, epochs, machine, wall
time) and PNG figures; ``experiments/make_results.py`` builds docs/results.md from them. Trained models are kept
in OUT/_models (not committed) and shared by the experiments that use the same stack, epochs, classes and seed.
``--quick`` runs a miniature (a few steps, few sharpening iterations) for the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository's package when run from a checkout

from dcgmm_fast import data  # noqa: E402
from dcgmm_fast.atomic import atomic_open  # noqa: E402
from dcgmm_fast.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dcgmm_fast.images import save_grid  # noqa: E402
from dcgmm_fast.metrics import auroc, original_auc  # noqa: E402
from dcgmm_fast.model import DCGMM  # noqa: E402
from dcgmm_fast.quality import PixelJudge, nearest_distance, within_class_spread  # noqa: E402
from dcgmm_fast.sampling import Sharpening  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "fashion_mnist.npz")

#: epochs per stack: the paper's, else reduced for the time of the session that ran them (the page says which)
EPOCHS = {"B-class": 15, "D": 20, "F": 3, "A": 80, "D-outliers": 10, "D-tied": 3, "C": 15}
PAPER_EPOCHS = {"B-class": 15, "D": 20, "F": 3, "A": 80, "D-outliers": 20, "D-tied": 20, "C": 15}


class Context:
    """What every experiment gets: the data, the seed, where to write, the quick switch and the judge."""

    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.quick = args.quick
        self.ds = data.load_dataset(args.data)
        self.out = args.out
        self._judge: Optional[PixelJudge] = None
        self.trained: Dict[str, float] = {}  # the training seconds of the models an experiment used

    def epochs(self, stack: str) -> float:
        return 0.2 if self.quick else EPOCHS[stack]

    def sharpening(self, model: DCGMM):
        """The library's default sharpening (each layer's), with few iterations under --quick."""
        if not self.quick:
            return None
        return {n: Sharpening(layer.sharpen_rate, 5) for n, layer in model.gmm_layers().items()
                if layer.sharpen_iterations > 0}

    def model(self, preset: str, *, classes: Optional[List[int]] = None, key: Optional[str] = None,
              tag_extra: str = "") -> DCGMM:
        """A trained model of ``preset`` (cached in OUT/_models), on ``classes`` only when given."""
        key = key or preset
        epochs = self.epochs(key)
        tag = f"{key}_e{epochs:g}_s{self.seed}{tag_extra}{'_quick' if self.quick else ''}"
        path = os.path.join(self.out, "_models", tag + ".pt")
        if os.path.exists(path):
            model, plan = load_checkpoint(path)
            self.trained[tag] = round(float(plan.get("train_seconds", float("nan"))), 1)
            return model
        x, y = self.train_split(classes)
        model = DCGMM(preset, self.ds.x_train.shape[1:], self.ds.n_classes, seed=self.seed)
        t0 = time.time()
        model.fit(x, y, epochs=epochs, seed=self.seed, verbose=not self.quick)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        seconds = time.time() - t0
        save_checkpoint(path, model, {"train_seconds": seconds, "epochs": epochs})
        self.trained[tag] = round(seconds, 1)
        return model

    def train_split(self, classes=None):
        x, y = self.ds.x_train, self.ds.y_train
        if classes is not None:
            keep = torch.isin(y, torch.tensor(classes))
            x, y = x[keep], y[keep]
        return x, y

    def judge(self) -> PixelJudge:
        if self._judge is None:
            self._judge = PixelJudge.fit(self.ds.x_train, self.ds.y_train, n_classes=self.ds.n_classes,
                                         max_iter=20 if self.quick else 200)
        return self._judge

    def class_names(self) -> List[str]:
        return list(self.ds.class_names or [str(c) for c in range(self.ds.n_classes)])

    def figure(self, name: str, file: str, images: torch.Tensor, n_cols: int, **kw) -> str:
        scale = max(1, 84 // max(images.shape[1], images.shape[2]))
        path = os.path.join(self.out, name, file)
        save_grid(path, images, n_cols, scale=scale, **kw)
        return file


def _machine() -> Dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ experiments
def classifier_b(ctx: Context, name: str) -> dict:
    """Preset B-class (spec 4, script classifier-B): the linear read-out's test accuracy after 1.5, 6, 12 and 15
    epochs (the original's anchors: 71.1%, 81.5%, 85.4%, 86.33%) and each GMM's test metric (mean over test images
    and positions of its smoothed max-component log score, with the Gaussian constant)."""
    epochs = ctx.epochs("B-class")
    model = DCGMM("B-class", ctx.ds.x_train.shape[1:], ctx.ds.n_classes, seed=ctx.seed)
    n = ctx.ds.x_train.shape[0]
    steps_per_epoch = -(-n // 100)
    total = int(round(epochs * steps_per_epoch))
    marks = sorted({max(1, int(round(f * total))) for f in (0.1, 0.4, 0.8, 1.0)})
    curve, t_train = [], 0.0
    for stop in marks:
        t0 = time.time()
        model.fit(ctx.ds.x_train, ctx.ds.y_train, epochs=epochs, seed=ctx.seed, resume=True, stop_step=stop,
                  verbose=not ctx.quick)
        t_train += time.time() - t0
        pred = model.classify(ctx.ds.x_test)
        curve.append({"epoch": round(stop / steps_per_epoch, 3), "step": stop,
                      "test_accuracy": float((pred == ctx.ds.y_test).float().mean())})
    mc = {k: float(v.mean()) for k, v in model.log_prob(ctx.ds.x_test, loss=None).items()}
    readout = _readout_adam(ctx, model, 0.2 if ctx.quick else 10)
    return {"test_accuracy": curve[-1]["test_accuracy"], "accuracy_curve": curve, "layer_metric_mc": mc,
            "readout_adam": readout,
            "train_seconds": t_train, "ms_per_step": 1000 * t_train / max(1, total), "steps": total,
            "anchor_original": {"test_accuracy": 0.8633, "curve": {"1.5": 0.711, "6": 0.815, "12": 0.854},
                                "layer_metric_mc": {"gmm1": -0.638, "gmm2": 11412.93}, "ms_per_step": 417}}


def _readout_adam(ctx: Context, model: DCGMM, epochs: float) -> dict:
    """What it takes past the original's 15 epochs: the GMMs frozen, the linear read-out trained on to convergence
    (Adam, lr 1e-3, batch 100, the same seeded order every epoch, no weight decay) for ``epochs`` more epochs; the
    test accuracy after each epoch."""
    clf = model.classifier
    reads = clf.reads
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(ctx.seed)
    n = ctx.ds.x_train.shape[0]
    steps = max(1, int(round(epochs * n / 100)))
    order = torch.randperm(n, generator=g)
    curve, t0 = [], time.time()
    for step in range(steps):
        idx = order[(step * 100) % n:(step * 100) % n + 100]
        with torch.no_grad():
            h = model(ctx.ds.x_train[idx])[reads]
        loss = torch.nn.functional.cross_entropy(clf(h), ctx.ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % (n // 100) == 0 or step + 1 == steps:
            acc = float((model.classify(ctx.ds.x_test) == ctx.ds.y_test).float().mean())
            curve.append({"extra_epoch": round((step + 1) * 100 / n, 3), "test_accuracy": acc})
    return {"curve": curve, "test_accuracy": curve[-1]["test_accuracy"], "best": max(c["test_accuracy"] for c in curve),
            "seconds": time.time() - t0}


def training_dynamics(ctx: Context, name: str) -> dict:
    """Preset F (script training-F, 3 epochs, waits 0/.1/.2/.3): every layer's training score and som_sigma over
    steps, as a figure; test metrics at the end."""
    from dcgmm_fast.show import plot_curves
    from PIL import Image

    model = DCGMM("F", ctx.ds.x_train.shape[1:], ctx.ds.n_classes, seed=ctx.seed)
    t0 = time.time()
    history = model.fit(ctx.ds.x_train, ctx.ds.y_train, epochs=ctx.epochs("F"), seed=ctx.seed,
                        verbose=not ctx.quick).history_
    seconds = time.time() - t0
    every = max(1, history.steps // 200)
    log = []
    for i in range(0, history.steps, every):
        entry = {"step": i + 1, "score": {k: v[i] for k, v in history.score.items()},
                 "som_sigma": {k: v[i] for k, v in history.som_sigma.items()}}
        if history.classifier_accuracy:
            entry["classifier_accuracy"] = history.classifier_accuracy[i]
        log.append(entry)
    picture = plot_curves(log)
    with atomic_open(os.path.join(ctx.out, name, "curves.png"), "wb") as f:
        Image.fromarray(picture, mode="RGB").save(f, format="PNG")
    scores, pred = model.evaluate(ctx.ds.x_test)
    return {"test_accuracy": float((pred == ctx.ds.y_test).float().mean()),
            "test_layer_metric_loglik": {k: float(v.mean()) for k, v in scores.items()},
            "final_som_sigma": {k: float(v.som_sigma) for k, v in model.gmm_layers().items()},
            "train_seconds": seconds, "steps": history.steps, "figures": ["curves.png"]}


def sampling(ctx: Context, name: str, preset: str = "D") -> dict:
    """Preset D (script sharpening-D): unconditional samples without and with the default sharpening (gmm1 and
    gmm2, 300 iterations); each sample's distance to its nearest training image beside real test images' (a
    model that copied its training set would be near 0)."""
    model = ctx.model(preset)
    n = 40 if not ctx.quick else 8
    out = {"figures": []}
    sharp = ctx.sharpening(model)
    if preset == "C":  # no sharpening default in preset C: D's setting on both GMMs
        sharp = {layer: Sharpening(0.1, 5 if ctx.quick else 300) for layer in model.gmm_layers()}
    for label, sharp in (("plain", False), ("sharpened", sharp)):
        g = torch.Generator().manual_seed(ctx.seed)
        t0 = time.time()
        x = model.sample(n, generator=g, sharpening=sharp)
        out[f"{label}_seconds"] = time.time() - t0
        out["figures"].append(ctx.figure(name, f"samples_{label}.png", x, 10))
        out[f"{label}_nearest_train_distance"] = float(nearest_distance(x, ctx.ds.x_train).median())
        out[f"{label}_judge_labels"] = torch.bincount(ctx.judge().predict(x), minlength=ctx.ds.n_classes).tolist()
    real = ctx.ds.x_test[:n]
    out["test_images_nearest_train_distance"] = float(nearest_distance(real, ctx.ds.x_train).median())
    return out


def sampling_c(ctx: Context, name: str) -> dict:
    """Preset C (script sharpening-C: 8x8 patches at stride 1, 49 components per position, pool, one shared GMM
    on top), 15 epochs: unconditional samples without and with sharpening (gmm1 and gmm2, 300 iterations
    at rate 0.1, preset D's), as for D."""
    return sampling(ctx, name, "C")


def class_conditional(ctx: Context, name: str) -> dict:
    """Preset D, model.sample(n, classes=...): the fraction the pixel judge labels as the requested class and the
    samples' within-class spread (diversity), for the original's class prior (spec 3.2, guidance=None) and the
    library's guided prior (the default), each without and with the default sharpening; the judge's own accuracy
    on real test images and the spread of real test images for scale."""
    model = ctx.model("D")
    judge = ctx.judge()
    per = 100 if not ctx.quick else 4
    wanted = torch.arange(ctx.ds.n_classes).repeat_interleave(per)
    real_x, real_y = ctx.ds.x_test[:1000], ctx.ds.y_test[:1000]
    out = {"judge_test_accuracy": judge.fraction_as(ctx.ds.x_test, ctx.ds.y_test), "figures": [],
           "real_within_class_spread": within_class_spread(real_x, real_y), "variants": {}}
    settings = {"original": {"guidance": None, "sharpening": False},
                "original-sharpened": {"guidance": None, "sharpening": ctx.sharpening(model)},
                "guided": {"sharpening": False},
                "guided-sharpened (default)": {"sharpening": ctx.sharpening(model)}}
    for label, kw in settings.items():
        g = torch.Generator().manual_seed(ctx.seed)
        t0 = time.time()
        x = model.sample(wanted.shape[0], classes=wanted, generator=g, **kw)
        out["variants"][label] = {
            "labelled_as_class": judge.fraction_as(x, wanted), "within_class_spread": within_class_spread(x, wanted),
            "per_class": [judge.fraction_as(x[wanted == c], wanted[wanted == c]) for c in range(ctx.ds.n_classes)],
            "seconds": time.time() - t0}
        if label in ("original", "guided-sharpened (default)"):
            show = torch.cat([x[wanted == c][:8] for c in range(ctx.ds.n_classes)])
            file = "by_class_default.png" if label.endswith("(default)") else "by_class_original.png"
            out["figures"].append(ctx.figure(name, file, show, min(8, per), row_labels=ctx.class_names()))
    return out


def _masks(h: int, w: int, g: torch.Generator) -> Dict[str, torch.Tensor]:
    right = torch.ones(h, w, dtype=torch.bool)
    right[:, w // 2:] = False
    centre = torch.ones(h, w, dtype=torch.bool)
    centre[h // 4: h - h // 4, w // 4: w - w // 4] = False
    random = torch.rand(h, w, generator=g) > 0.5
    return {"right-half": right, "centre": centre, "random": random}


def inpainting(ctx: Context, name: str) -> dict:
    """Preset D: complete the right half, the centre and a random half of the pixels of test images (variants from
    the top GMM, spec 3.4), as the original (missing pixels black, one round) and as the library's default (each
    image's mean known pixel to start, 3 rounds); the error on the missing pixels beside filling them with the
    training mean image, and the judge's accuracy on the completed images (real ones for scale)."""
    model = ctx.model("D")
    judge = ctx.judge()
    n = 100 if not ctx.quick else 8
    x, y = ctx.ds.x_test[:n], ctx.ds.y_test[:n]
    mean_image = ctx.ds.x_train.mean(0, keepdim=True)
    g = torch.Generator().manual_seed(ctx.seed)
    out = {"figures": [], "judge_accuracy_originals": judge.fraction_as(x, y), "n_images": n}
    for kind, mask in _masks(x.shape[1], x.shape[2], g).items():
        missing = ~mask[None, :, :, None].expand_as(x)
        out[kind] = {"rmse_missing_mean_image": float((mean_image.expand_as(x) - x)[missing].square().mean().sqrt())}
        shown = [x[:8], torch.where(mask[None, :, :, None], x[:8], torch.zeros(()))]
        for label, kw in (("original", {"fill": 0.0, "iterations": 1}), ("default", {})):
            t0 = time.time()
            done = model.inpaint(x, mask, generator=g, sharpening=ctx.sharpening(model), **kw)
            out[kind][label] = {"rmse_missing": float((done - x)[missing].square().mean().sqrt()),
                                "judge_accuracy_completed": judge.fraction_as(done, y), "seconds": time.time() - t0}
            shown.append(done[:8])
        out["figures"].append(ctx.figure(name, f"inpaint_{kind}.png", torch.cat(shown), 8,
                                         row_labels=["original", "masked", "original's", "default"]))
    return out


def variants(ctx: Context, name: str) -> dict:
    """Preset D: variants of test images from the responsibilities of gmm3 (top) and of gmm2 (spec 3.4); how often
    the judge gives a variant its source image's class."""
    model = ctx.model("D")
    judge = ctx.judge()
    n, k = (8, 6) if not ctx.quick else (2, 2)
    x = ctx.ds.x_test[:n]
    src = ctx.ds.y_test[:n].repeat_interleave(k)
    out = {"figures": []}
    for root in ("gmm3", "gmm2"):
        g = torch.Generator().manual_seed(ctx.seed)
        v = model.variants(x.repeat_interleave(k, 0), root=root, generator=g, sharpening=ctx.sharpening(model))
        out[f"{root}_same_class"] = judge.fraction_as(v, src)
        rows = torch.cat([torch.cat([x[i:i + 1], v[i * k:(i + 1) * k]]) for i in range(n)])
        out["figures"].append(ctx.figure(name, f"variants_{root}.png", rows, k + 1))
    return out


def outliers(ctx: Context, name: str) -> dict:
    """The paper's outlier experiment (spec 3.5): train preset D on classes 1-9, score the test images of 1-9
    (inliers) and of class 0 (outliers) by each GMM's mean training-loss score; exact AUROC and the original's
    100-threshold AUC."""
    held = ctx.args.heldout
    if not 0 <= held < ctx.ds.n_classes:
        raise SystemExit(f"run.py: error: --heldout: expected a class in [0, {ctx.ds.n_classes}), got {held}")
    classes = [c for c in range(ctx.ds.n_classes) if c != held]
    model = ctx.model("D", classes=classes, key="D-outliers", tag_extra=f"_held{held}")
    inl = torch.isin(ctx.ds.y_test, torch.tensor(classes))
    scores = model.log_prob(ctx.ds.x_test, loss=None)
    out = {"heldout_class": held, "heldout_name": ctx.class_names()[held]}
    for layer, s in scores.items():
        out[layer] = {"auroc": auroc(s[inl], s[~inl]), "auc_original": original_auc(s[inl], s[~inl])}
    return out


def flat_gmm(ctx: Context, name: str) -> dict:
    """Preset A, the flat GMM baseline (one GMM on whole images, K = 49): test accuracy, samples (its prototypes
    plus noise) and class-conditional samples under the same judge as D."""
    model = ctx.model("A")
    judge = ctx.judge()
    scores, pred = model.evaluate(ctx.ds.x_test)
    per = 100 if not ctx.quick else 4
    wanted = torch.arange(ctx.ds.n_classes).repeat_interleave(per)
    g = torch.Generator().manual_seed(ctx.seed)
    x = model.sample(wanted.shape[0], classes=wanted, generator=g)
    u = model.sample(40 if not ctx.quick else 8, generator=g)
    return {"test_accuracy": float((pred == ctx.ds.y_test).float().mean()),
            "labelled_as_class": judge.fraction_as(x, wanted),
            "nearest_train_distance": float(nearest_distance(u, ctx.ds.x_train).median()),
            "figures": [ctx.figure(name, "samples.png", u, 10)]}


def tied_init(ctx: Context, name: str) -> dict:
    """Why preset D ties its initialisation: preset D trained 3 epochs with independent means drawn per position
    (the original) and with one draw for every position (tied_init). Per GMM below a pool: the mean distance
    between component k's means at horizontally neighbouring positions, beside that of randomly paired components
    (aligned components: much smaller); images re-sampled from their own pool1 maps (RMSE to the images); test
    accuracy; unconditional samples (sharpened) and the judge's labels of class-conditional ones."""
    import dataclasses

    from dcgmm_fast import presets
    from dcgmm_fast.sampling import sample_down

    judge = ctx.judge()
    epochs = 0.2 if ctx.quick else 3
    x = ctx.ds.x_test[:200]
    out = {"figures": []}
    for tied in (False, True):
        specs = [dataclasses.replace(s, tied_init=tied) if isinstance(s, presets.GMM) else s
                 for s in presets.PRESETS["D"].layers]
        model = DCGMM(specs, ctx.ds.x_train.shape[1:], ctx.ds.n_classes, seed=ctx.seed)
        t0 = time.time()
        model.fit(ctx.ds.x_train, ctx.ds.y_train, epochs=epochs, seed=ctx.seed, verbose=not ctx.quick)
        label = "tied" if tied else "per_position"
        r = {"train_seconds": time.time() - t0}
        g = torch.Generator().manual_seed(ctx.seed)
        for gname in ("gmm1", "gmm2"):
            layer = model[gname]
            Ho, Wo, K = layer.out_shape
            mu = layer.mu.detach().reshape(Ho, Wo, K, -1)
            a, b = mu[:, :-1], mu[:, 1:]
            perm = torch.randperm(K, generator=g)
            r[f"{gname}_neighbour_same_k"] = float((a - b).square().sum(-1).mean())
            r[f"{gname}_neighbour_random_k"] = float((a - b[:, :, perm]).square().sum(-1).mean())
        with torch.no_grad():
            pooled = model(x)["pool1"]
        v = sample_down(model.layers, model.names, "pool1", pooled, generator=g, sharpening=False).clamp(0, 1)
        r["pool1_resample_rmse"] = float((v - x).square().mean().sqrt())
        r["test_accuracy"] = float((model.classify(ctx.ds.x_test) == ctx.ds.y_test).float().mean())
        wanted = torch.arange(ctx.ds.n_classes).repeat_interleave(10 if ctx.quick else 20)
        xc = model.sample(wanted.shape[0], classes=wanted, generator=g, sharpening=False, guidance=None)
        r["class_conditional_labelled_as_class"] = judge.fraction_as(xc, wanted)
        u = model.sample(8 if ctx.quick else 30, generator=g, sharpening=ctx.sharpening(model))
        out["figures"].append(ctx.figure(name, f"samples_{label}.png", u, 10))
        out[label] = r
    return out


EXPERIMENTS = {
    "classifier-B": (classifier_b, "B-class"), "training-dynamics": (training_dynamics, "F"),
    "sampling": (sampling, "D"), "class-conditional": (class_conditional, "D"), "inpainting": (inpainting, "D"),
    "variants": (variants, "D"), "outliers": (outliers, "D-outliers"), "flat-gmm": (flat_gmm, "A"),
    "tied-init": (tied_init, "D-tied"), "sampling-C": (sampling_c, "C"),
}


def run(ctx: Context, name: str, folder: str) -> dict:
    """Run experiment ``name``, writing OUT/``folder``/metrics.json and its figures."""
    fn, stack = EXPERIMENTS[name]
    os.makedirs(os.path.join(ctx.out, folder), exist_ok=True)
    t0 = time.time()
    ctx.trained = {}
    result = fn(ctx, folder)
    result = {"experiment": folder, "doc": " ".join(fn.__doc__.split()), "stack": stack,
              "epochs": ctx.epochs(stack), "paper_epochs": PAPER_EPOCHS[stack], "seed": ctx.seed,
              "data": os.path.basename(ctx.args.data), "quick": ctx.quick,
              "command": "python experiments/run.py " + shlex.join([name] + ctx.args.rest),
              "wall_seconds": round(time.time() - t0, 1), "machine": _machine(),
              "date": time.strftime("%Y-%m-%d"), "model_train_seconds": ctx.trained, **result}
    with atomic_open(os.path.join(ctx.out, folder, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(EXPERIMENTS) + ["all"])
    p.add_argument("--data", default=DEFAULT_DATA, help="dataset spec (dcgmm train --data); default Fashion-MNIST")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=0, help="outliers: the class left out of training")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="a miniature: a few steps (for the tests)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    args.rest = [a for a in argv if a != args.name]
    if not os.path.exists(args.data) and args.data != "shipped" and ":" not in args.data:
        p.error(f"--data: {args.data}: no such file")
    ctx = Context(args)
    for name in (sorted(EXPERIMENTS) if args.name == "all" else [args.name]):
        result = run(ctx, name, f"outliers-{args.heldout}" if name == "outliers" and args.heldout != 0 else name)
        print(json.dumps({k: v for k, v in result.items() if k not in ("doc", "machine")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
