"""Write docs/api.md, the API reference, from the package's docstrings (no network, no third-party tool).

    python tools/make_api_docs.py [--check]      # --check: exit 1 when docs/api.md is out of date
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "api.md")

#: (module, names, title): what the reference lists, in this order
SECTIONS = [
    ("dcgmm_fast.model", ["DCGMM"], "The model"),
    ("dcgmm_fast.presets", ["GMM", "Pool", "Classifier", "Preset", "get_preset", "override"], "Stacks and presets"),
    ("dcgmm_fast.layers", ["ConvGMM", "MaxPool", "LinearClassifier"], "Layers (torch.nn)"),
    ("dcgmm_fast.ops", ["cgmm", "patches", "patch_average", "sample_components", "smoothing_matrix",
                        "smoothing_factors", "cgmm_step_partials", "cgmm_step_finalize", "available_backends",
                        "resolve_backend"], "Ops"),
    ("dcgmm_fast.sampling", ["Sharpening"], "Sampling"),
    ("dcgmm_fast.queries", ["marginal_cgmm", "mpe_completion"], "Queries with unknown pixels"),
    ("dcgmm_fast.init", ["init_from_data"], "Initialisation from data"),
    ("dcgmm_fast.train", ["Trainer", "History"], "Training"),
    ("dcgmm_fast.callbacks", ["JsonlLog", "TensorBoard", "chain", "log_entry"], "Callbacks"),
    ("dcgmm_fast.checkpoint", ["save_checkpoint", "load_checkpoint", "CheckpointError"], "Checkpoints"),
    ("dcgmm_fast.data", ["load_dataset", "load_shipped", "to_images"], "Data"),
    ("dcgmm_fast.quality", ["PixelJudge"], "Judging samples"),
]


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "(no docstring)")


def _signature(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def _anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, spaces to hyphens, punctuation dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c == "-")


def _block(text: str) -> list:
    return ["```", text, "```"]


def render() -> str:
    import importlib

    lines = ["# API reference", "",
             "Generated from the docstrings by `python tools/make_api_docs.py` (a test checks it is current).",
             "Getting started: [getting-started.md](getting-started.md); settings and environment variables:",
             "[configuration.md](configuration.md).", ""]
    lines += ["## Contents", ""] + [f"- [{title}](#{_anchor(title)})" for _, _, title in SECTIONS] + [""]
    for module_name, names, title in SECTIONS:
        module = importlib.import_module(module_name)
        lines += [f"## {title}", "", f"`{module_name}`", ""]
        for name in names:
            obj = getattr(module, name)
            lines += [f"### `{name}`", ""] + _block(_signature(name, obj)) + ["", _doc(obj), ""]
            if inspect.isclass(obj):
                if dataclasses.is_dataclass(obj):
                    fields = ", ".join(f"`{f.name}`" for f in dataclasses.fields(obj))
                    lines += [f"Fields: {fields}", ""]
                members = [(n, m) for n, m in vars(obj).items() if not n.startswith("_")
                           and (inspect.isfunction(m) or isinstance(m, (property, classmethod)))]
                for n, m in members:
                    fn = m.fget if isinstance(m, property) else (m.__func__ if isinstance(m, classmethod) else m)
                    head = f"{name}.{n}" + ("" if isinstance(m, property) else str(inspect.signature(fn)))
                    lines += [f"#### `{name}.{n}`" + (" (property)" if isinstance(m, property) else ""), ""]
                    lines += _block(head) + ["", _doc(fn), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != text:
            print(f"{OUT} is out of date: run python tools/make_api_docs.py", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
