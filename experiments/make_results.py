"""Build docs/results.md (and docs/figures/) from the committed experiments/results/*/metrics.json.

    python experiments/make_results.py [--results experiments/results] [--docs docs]

Every number on the page is read from a metrics.json that ``experiments/run.py`` wrote; the page names each one's
command, seed, epochs (the paper's beside them), machine and wall time. Nothing is typed in by hand except the
original TF2 code's measured anchors (issue 22), which are labelled as such.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["classifier-B", "training-dynamics", "tied-init", "sampling", "sampling-C", "class-conditional", "inpainting",
         "variants", "outliers", "flat-gmm"]


def _pct(v) -> str:
    return f"{100 * v:.1f}%"


def _f(v, digits=3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def load(results: str) -> Dict[str, dict]:
    out = {}
    extra = sorted(d for d in os.listdir(results) if d.startswith("outliers-")) if os.path.isdir(results) else []
    for name in ORDER + extra:
        path = os.path.join(results, name, "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
    return out


def _figures(m: dict, results: str, docs: str, alt: str) -> List[str]:
    lines = []
    for fig in m.get("figures", []):
        src = os.path.join(results, m["experiment"], fig)
        dst_name = f"{m['experiment']}_{fig}"
        os.makedirs(os.path.join(docs, "figures"), exist_ok=True)
        shutil.copyfile(src, os.path.join(docs, "figures", dst_name))
        lines.append(f"![{alt}: {fig}](figures/{dst_name})")
    return lines


def _provenance(m: dict) -> str:
    mach = m["machine"]
    epochs = f"{m['epochs']:g} epochs"
    if m["epochs"] != m["paper_epochs"]:
        epochs += f" (the paper's script: {m['paper_epochs']:g}" + ("" if m["quick"] else "; reduced") + ")"
    trained = ", ".join(f"{k}: {v:g} s" for k, v in m.get("model_train_seconds", {}).items())
    return (f"`{m['command']}` · seed {m['seed']} · {epochs} · {m['wall_seconds']:g} s"
            + (f" (+ training {trained})" if trained else "") + f" · {mach['cpu_count']} CPUs, "
            f"{mach['torch_threads']} threads, torch {mach['torch']}, {m['date']}"
            + (" · **quick**" if m["quick"] else ""))


def section(name: str, m: dict, results: str, docs: str) -> List[str]:
    L = [f"## {name}", "", m["doc"], "", _provenance(m), ""]
    if name == "classifier-B":
        a = m["anchor_original"]
        L += ["| | ours | original TF2 (measured) |", "|---|---|---|"]
        for point in m["accuracy_curve"]:
            last = point is m["accuracy_curve"][-1]
            ref = a["curve"].get(f"{point['epoch']:g}", a["test_accuracy"] if last else None)
            L.append(f"| test accuracy after {point['epoch']:g} epochs | {_pct(point['test_accuracy'])} | "
                     f"{_pct(ref) if ref is not None else '-'} |")
        for k, v in m["layer_metric_mc"].items():
            L.append(f"| {k} test metric (mean smoothed max-component score) | {v:.3f} | "
                     f"{a['layer_metric_mc'].get(k, '-')} |")
        L.append(f"| ms per training step | {m['ms_per_step']:.1f} | {a['ms_per_step']} |")
        r = m.get("readout_adam")
        if r:
            L += ["", f"The read-out trained on with the GMMs frozen (Adam, lr 1e-3, {r['curve'][-1]['extra_epoch']:g} "
                  f"more epochs, {r['seconds']:.0f} s): test accuracy {_pct(r['test_accuracy'])} (best epoch "
                  f"{_pct(r['best'])}); by extra epoch: "
                  + ", ".join(_pct(c["test_accuracy"]) for c in r["curve"]) + "."]
    elif name == "training-dynamics":
        L += [f"Test accuracy {_pct(m['test_accuracy'])} after {m['steps']} steps; final som_sigma "
              + ", ".join(f"{k} {v:.3f}" for k, v in m["final_som_sigma"].items()) + "; test log-likelihood "
              + ", ".join(f"{k} {v:.2f}" for k, v in m["test_layer_metric_loglik"].items()) + "."]
    elif name in ("sampling", "sampling-C"):
        L += ["| | plain | sharpened (default) | real test images |", "|---|---|---|---|",
              f"| median distance to the nearest training image | {m['plain_nearest_train_distance']:.2f} | "
              f"{m['sharpened_nearest_train_distance']:.2f} | {m['test_images_nearest_train_distance']:.2f} |",
              f"| seconds for the samples shown | {m['plain_seconds']:.2f} | {m['sharpened_seconds']:.2f} | |",
              f"| judge's labels of the samples (per class) | {m['plain_judge_labels']} | "
              f"{m['sharpened_judge_labels']} | |"]
    elif name == "class-conditional":
        L += [f"The judge (softmax regression on raw pixels, L-BFGS) labels {_pct(m['judge_test_accuracy'])} of the "
              f"real test images correctly; real test images of one class lie {m['real_within_class_spread']:.2f} "
              "apart on average (the within-class spread).", "",
              "| class prior | labelled as the requested class | within-class spread | seconds |",
              "|---|---|---|---|"]
        for label, v in m["variants"].items():
            L.append(f"| {label} | **{_pct(v['labelled_as_class'])}** | {v['within_class_spread']:.2f} | "
                     f"{v['seconds']:.1f} |")
        L += ["", "Per class (" + ", ".join(m["variants"]) + "): " + "; ".join(
            f"{c}: " + "/".join(_pct(v["per_class"][c]) for v in m["variants"].values())
            for c in range(len(next(iter(m["variants"].values()))["per_class"]))) + "."]
    elif name == "inpainting":
        L += [f"{m.get('n_images', '')} test images; the judge's accuracy on them uncut: "
              f"{_pct(m['judge_accuracy_originals'])}. Rows of each figure: the image, the masked image, the "
              "original's completion (missing pixels black, one round), the default (mean known pixel, 3 rounds).",
              "",
              "| mask | completion | RMSE on the missing pixels | judge accuracy, completed | seconds |",
              "|---|---|---|---|---|"]
        for kind in ("right-half", "centre", "random"):
            r = m[kind]
            L.append(f"| {kind} | training mean image | {r['rmse_missing_mean_image']:.3f} | | |")
            for label in ("original", "default"):
                v = r[label]
                L.append(f"| {kind} | {label} | {v['rmse_missing']:.3f} | {_pct(v['judge_accuracy_completed'])} | "
                         f"{v['seconds']:.0f} |")
    elif name == "variants":
        L += [f"Variants labelled as their source's class: from gmm3 {_pct(m['gmm3_same_class'])}, from gmm2 "
              f"{_pct(m['gmm2_same_class'])}. Each row: the source image, then its variants."]
    elif name.startswith("outliers"):
        L += [f"Held-out class {m['heldout_class']} ({m['heldout_name']}).", "",
              "| scored at | AUROC (exact) | AUC, the original's 100 thresholds |", "|---|---|---|"]
        for k, v in m.items():
            if isinstance(v, dict) and "auroc" in v:
                L.append(f"| {k} | {v['auroc']:.3f} | {v['auc_original']:.3f} |")
    elif name == "tied-init":
        L += ["| | means drawn per position (the original) | tied (one draw for every position) |", "|---|---|---|"]
        a, b = m["per_position"], m["tied"]
        rows = [("gmm1: neighbouring positions, same component", "gmm1_neighbour_same_k", "{:.3f}"),
                ("gmm1: neighbouring positions, random pairing", "gmm1_neighbour_random_k", "{:.3f}"),
                ("gmm2: neighbouring positions, same component", "gmm2_neighbour_same_k", "{:.3f}"),
                ("gmm2: neighbouring positions, random pairing", "gmm2_neighbour_random_k", "{:.3f}"),
                ("RMSE of images re-sampled from their pool1 maps", "pool1_resample_rmse", "{:.3f}")]
        for title, key, fmt in rows:
            L.append(f"| {title} | {fmt.format(a[key])} | {fmt.format(b[key])} |")
        L.append(f"| test accuracy | {_pct(a['test_accuracy'])} | {_pct(b['test_accuracy'])} |")
        L.append(f"| class-conditional samples (original prior, plain) labelled as their class | "
                 f"{_pct(a['class_conditional_labelled_as_class'])} | "
                 f"{_pct(b['class_conditional_labelled_as_class'])} |")
        L += ["", "Unconditional samples (sharpened): per-position means first, tied second."]
    elif name == "flat-gmm":
        L += [f"Test accuracy {_pct(m['test_accuracy'])}; class-conditional samples labelled as their class "
              f"{_pct(m['labelled_as_class'])}; median distance to the nearest training image "
              f"{m['nearest_train_distance']:.2f}."]
    L.append("")
    figs = _figures(m, results, docs, name)
    if figs:
        L += [" ".join(figs), ""]
    return L


def build(results: str, docs: str, intro: str = "") -> str:
    ms = load(results)
    L = ["# dcgmm_fast results: the paper's experiments on Fashion-MNIST", "",
         "Generated by `python experiments/make_results.py` from `experiments/results/*/metrics.json`; every number "
         "below comes from the command printed under it (`python experiments/run.py NAME`, the data "
         "`fashion_mnist.npz`: 60,000 training and 10,000 test images). Anchors marked *original* are the authors' "
         "TF2 code as measured on the same kind of 2-core machine (issue 22).", ""]
    if intro:
        L += [intro, ""]
    missing = [n for n in ORDER if n not in ms]
    if missing:
        L += ["Not run yet: " + ", ".join(missing) + ".", ""]
    for name in ms:
        L += section(name, ms[name], results, docs)
    text = "\n".join(L) + "\n"
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "results.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--docs", default=os.path.join(os.path.dirname(HERE), "docs"))
    p.add_argument("--intro", default=os.path.join(HERE, "results_intro.md"),
                   help="a Markdown file placed under the title (the discussion); skipped when absent")
    args = p.parse_args(argv)
    intro = open(args.intro).read().strip() if os.path.exists(args.intro) else ""
    build(args.results, args.docs, intro)
    print(os.path.join(args.docs, "results.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
