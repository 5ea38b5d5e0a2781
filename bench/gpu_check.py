"""The stages of the GPU check (``bench/gpu_check.sh`` runs each in its own process under ``timeout``).

    python3 bench/gpu_check.py STAGE RESULTS_DIR

Every stage appends one JSON object per measurement to RESULTS_DIR/results.jsonl as it goes ({"stage": ...,
...}), so a stage that overruns loses only what it had not written. Times are CUDA-synchronised
(``triton.testing.do_bench``); the roofline fractions use the ceilings measured by the ``ceilings`` stage of the
same run (fp32 matmul with TF32 off, copy bandwidth), never datasheet numbers. ``summary`` writes summary.md.
Without a CUDA device every stage records {"unavailable": ...} and exits 0 (so the script runs on CPU too).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

#: the paper's layer shapes: (input (H, W, C), kernel, stride, K, independent)
LAYERS = {
    "28x28x1 3x3 K25 S (D, E, F layer 1)": ((28, 28, 1), 3, 1, 25, False),
    "28x28x1 4x4s2 K121 I (classifier-B layer 1)": ((28, 28, 1), 4, 2, 121, True),
    "13x13x25 4x4 K25 I (D layer 2)": ((13, 13, 25), 4, 1, 25, True),
    "26x26x25 4x4s2 K100 S (D = 400)": ((26, 26, 25), 4, 2, 100, False),
    "12x12x25 12x12 K49 S (E layer 3, D = 3600)": ((12, 12, 25), 12, 1, 49, False),
}
LARGE_D = "26x26x25 4x4s2 K100 S (D = 400)"
#: GPU_CHECK_DRY_RUN=1: run the stages on CPU tensors under TRITON_INTERPRET=1 at tiny batches, to check the
#: script itself before a GPU session spends its minutes on it (numbers from a dry run mean nothing)
DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"


def batch_size(n: int) -> int:
    return 2 if DRY else n


class Results:
    def __init__(self, out_dir: str, stage: str):
        self.path, self.stage = os.path.join(out_dir, "results.jsonl"), stage

    def add(self, **row) -> None:
        row = {"stage": self.stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def read(self, stage: str):
        if not os.path.exists(self.path):
            return []
        rows = [json.loads(line) for line in open(self.path) if line.strip()]
        return [r for r in rows if r.get("stage") == stage]


# -------------------------------------------------------------------------------------------------- inputs
def trained_inputs(layer, batch: int, device, seed: int = 0, dtype=torch.float32):
    """Trained-regime inputs of a layer (tests/test_backends.py's recipe): real-looking images or sharp
    responsibility maps, mu on the data's own patches plus small noise, sigma in [0.95, 1] * sqrt(20)."""
    from dcgmm_fast import geometry

    (H, W, C), kernel, stride, K, indep = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    if C == 1:
        from dcgmm_fast import data

        x = data.load_shipped().x_train[:batch].double()
        if x.shape[0] < batch:
            x = x.repeat(math.ceil(batch / x.shape[0]), 1, 1, 1)[:batch]
    else:
        x = torch.softmax(8.0 * torch.randn(batch, H, W, C, generator=g, dtype=torch.float64), -1)
    p = geometry.patches(x[: min(batch, 64)], kernel, stride)
    n, Ho, Wo, D = p.shape
    P = Ho * Wo
    flat = p.reshape(n, P, D)
    if indep:
        pick = torch.randint(0, n, (P, K), generator=g)
        mu = flat[pick, torch.arange(P)[:, None]]
    else:
        mu = flat[torch.randint(0, n, (K,), generator=g), torch.randint(0, P, (K,), generator=g)]
    mu = mu + 0.01 * torch.randn(mu.shape, generator=g, dtype=torch.float64)
    sigma = math.sqrt(20.0) * (0.95 + 0.05 * torch.rand(mu.shape, generator=g, dtype=torch.float64))
    log_pi = torch.log_softmax(0.3 * torch.randn(mu.shape[:-1], generator=g, dtype=torch.float64), -1)
    G = geometry.smoothing_factors(K, 0.25 * math.sqrt(2 * K), dtype=torch.float64)
    cast = [t.to(device=device, dtype=dtype) for t in (x, mu, sigma, log_pi)]
    return cast, G.to(device=device, dtype=dtype), dict(kernel=kernel, stride=stride)


def flops(M, K, D, mode, loss):
    """design.md's count: forward 4 M K D + 2 M K^2 (dense smoothing, mc), parameter backward 4 M K D."""
    f = 4 * M * K * D + (2 * M * K * K if loss == "mc" else 0)
    return f if mode == "forward" else f + 4 * M * K * D


def traffic(x, mu, M, K, mode):
    """Compulsory HBM bytes: input, parameters, outputs (resp, score, lse, kstar), resp again in backward."""
    t = x.numel() * 4 + 3 * mu.numel() * 4 + M * K * 4 + 3 * M * 4
    return t if mode == "forward" else t + M * K * 4 + 3 * mu.numel() * 4


def bench_ms(fn) -> float:
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=40))


@contextlib.contextmanager
def environ(env):
    """Set environment variables for the block (the backends read DCGMM_TRITON_* per call), then restore them."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _cuda_or_skip(res: Results) -> bool:
    if not torch.cuda.is_available() and not DRY:
        res.add(unavailable="no CUDA device")
        return False
    return True


# -------------------------------------------------------------------------------------------------- stages
def stage_env(res: Results, out: str) -> None:
    import numpy

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                numpy=numpy.__version__, host=platform.node())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["clocks"] = q.stdout.strip() or q.stderr.strip()
    res.add(**info)


def stage_build(res: Results, out: str) -> None:
    """The CUDA library for this GPU (csrc/cuda, tools/cuda_build.py; sm_90a only unless DCGMM_CUDA_ARCHS says
    otherwise, to save the machine's minutes), unless an up-to-date one is there."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_build

    target = os.path.join(ROOT, "dcgmm_fast", cuda_build.LIBRARY)
    newest = max(os.path.getmtime(f) for f in cuda_build.sources())
    if os.path.exists(target) and os.path.getmtime(target) >= newest:
        res.add(library=target, built=False, note="up to date")
        return
    os.environ.setdefault("DCGMM_CUDA_ARCHS", "sm_90a")
    t = time.perf_counter()
    try:
        cuda_build.build(os.path.dirname(target), jobs=os.cpu_count() or 4)
        res.add(library=target, built=True, archs=os.environ["DCGMM_CUDA_ARCHS"],
                seconds=round(time.perf_counter() - t, 1))
    except Exception as e:  # noqa: BLE001
        res.add(library=target, built=False, error=str(e)[-2000:])


def stage_ceilings(res: Results, out: str) -> None:
    if not _cuda_or_skip(res):
        return
    from roofline import gpu_ceilings

    res.add(**gpu_ceilings())


def stage_tests(res: Results, out: str) -> None:
    """The backend tests on CUDA tensors (the Triton kernels compiled, not interpreted), without -x."""
    if not _cuda_or_skip(res):
        return
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "pytest", "tests/test_backends.py", "tests/test_step_ops.py",
           "tests/test_cuda_backend.py", "-q", "-p", "no:cacheprovider", "-k", "cuda", "-rfE"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    text = p.stdout + p.stderr
    print(text[-20000:], flush=True)  # into gpu_check.log
    counts = {k: int(v) for v, k in __import__("re").findall(r"(\d+) (passed|failed|skipped|error)", text[-3000:])}
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    res.add(exit=p.returncode, **counts, failures=failed[:30])


def _ceilings(res: Results):
    rows = [r for r in res.read("ceilings") if "fp32_flops" in r]
    return rows[-1] if rows else None


def _rule(out, ref64, ref32):
    """(error, the float32 reference's own error, ratio to the 4x rule's bound) per tensor."""
    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        den = b.abs().max().item()
        return (a - b).abs().max().item() / den if den > 0 else (a - b).abs().max().item()

    err, own = rel(out, ref64), rel(ref32, ref64)
    return err, own, err / (4 * own + 1e-6)


#: (variant, backend, environment) of the accuracy and timing stages
_VARIANTS = (("ieee", "triton", {}), ("tf32x3", "triton", {"DCGMM_TRITON_PRECISION": "tf32x3"}),
             ("v1", "triton", {"DCGMM_TRITON_KERNELS": "v1"}), ("cuda", "cuda", {}),
             ("cuda-wgmma", "cuda", {"DCGMM_CUDA_FORWARD": "wgmma"}))


def _variant_applies(variant: str, mu: torch.Tensor) -> bool:
    """cuda: K <= 128; its warpgroup-MMA forward: shared layers on sm_90 only."""
    if variant.startswith("cuda") and mu.shape[-2] > 128:
        return False
    if variant == "cuda-wgmma":
        return mu.dim() == 2 and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    return True


def stage_accuracy(res: Results, out: str) -> None:
    """Trained-regime error of every output and parameter gradient on CUDA against float64, for the triton
    kernels (ieee, tf32x3, v1) and the cuda backend (its direct kernels; its warpgroup-MMA forward where it
    applies): err / (4 x the float32 reference's own error + 1e-6) must stay <= 1."""
    if not _cuda_or_skip(res):
        return
    from dcgmm_fast import geometry, ops, reference

    for layer in LAYERS:
        inputs, G, kw = trained_inputs(layer, batch_size(16), DEVICE)
        for loss in ("mc", "loglik"):
            smoothing = G if loss == "mc" else None
            cpu64 = [t.double().cpu().requires_grad_() for t in inputs]
            cpu32 = [t.float().cpu().requires_grad_() for t in inputs]
            for variant, backend, env in _VARIANTS:
                if not _variant_applies(variant, inputs[1]):
                    continue
                with environ(env):
                    dev = [t.clone().requires_grad_() for t in inputs]
                    try:
                        o = ops.cgmm(*dev, loss=loss, smoothing=smoothing, backend=backend, **kw)
                    except Exception as e:  # noqa: BLE001
                        res.add(layer=layer, loss=loss, variant=variant, error=f"{type(e).__name__}: {e}"[:300])
                        continue
                    obj = o.score.sum() + (o.resp * torch.linspace(-1, 1, o.resp.shape[-1], device=DEVICE)).sum()
                    grads = torch.autograd.grad(obj, dev)
                kstar = o.kstar.cpu() if loss == "mc" else None
                G64 = None if smoothing is None else geometry.smoothing_dense(G.double().cpu())
                G32 = None if smoothing is None else geometry.smoothing_dense(G.float().cpu())
                r64 = reference.cgmm(*cpu64, loss=loss, smoothing=G64, kstar=kstar, **kw)
                r32 = reference.cgmm(*cpu32, loss=loss, smoothing=G32, kstar=kstar, **kw)
                worst = {}
                for name in ("resp", "score", "lse"):
                    worst[name] = _rule(getattr(o, name), getattr(r64, name), getattr(r32, name))
                up = torch.linspace(-1, 1, o.resp.shape[-1])
                g64 = torch.autograd.grad(r64.score.sum() + (r64.resp * up.double()).sum(), cpu64)
                g32 = torch.autograd.grad(r32.score.sum() + (r32.resp * up).sum(), cpu32)
                for name, a, b, c in zip(("dx", "d_mu", "d_sigma", "d_log_pi"), grads, g64, g32):
                    worst[name] = _rule(a, b, c)
                ratio = max(v[2] for v in worst.values())
                res.add(layer=layer, loss=loss, variant=variant, worst_ratio=ratio, passes=ratio <= 1.0,
                        errors={k: [f"{v[0]:.2e}", f"{v[1]:.2e}"] for k, v in worst.items()})


def _run_fn(backend, x, params, kw, loss, smoothing, mode, env=None):
    from dcgmm_fast import ops

    def run():
        with environ(env):
            if mode == "forward":
                with torch.no_grad():
                    ops._cgmm_unchecked(x, *params, loss=loss, smoothing=smoothing, backend=backend, **kw)
            else:
                o = ops._cgmm_unchecked(x, *params, loss=loss, smoothing=smoothing, backend=backend, **kw)
                torch.autograd.grad(o.score.mean(), params)

    return run


def stage_timings(res: Results, out: str) -> None:
    """Per layer at batch 1000: forward and forward + parameter backward, triton (one-pass and v1) and the eager
    reference, with roofline fractions and the speed-up over the reference."""
    if not _cuda_or_skip(res):
        return
    ceil = _ceilings(res)
    for layer in LAYERS:
        inputs, G, kw = trained_inputs(layer, batch_size(1000), DEVICE)
        x, mu, sigma, log_pi = inputs
        params = [t.requires_grad_() for t in (mu, sigma, log_pi)]
        M = x.shape[0] * math.prod(geometry_out(x, kw))
        K, D = mu.shape[-2], mu.shape[-1]
        for loss in ("mc", "loglik"):
            smoothing = G if loss == "mc" else None
            for mode in ("forward", "fwd+bwd"):
                base = None
                for provider, backend, env in (("reference", "reference", None), ("triton", "triton", None),
                                               ("triton-v1", "triton", {"DCGMM_TRITON_KERNELS": "v1"}),
                                               ("cuda", "cuda", None),
                                               ("cuda-wgmma", "cuda", {"DCGMM_CUDA_FORWARD": "wgmma"})):
                    if provider.startswith("cuda") and not _variant_applies(provider, mu):
                        continue
                    if provider == "cuda-wgmma" and mode != "forward":
                        continue
                    try:
                        ms = bench_ms(_run_fn(backend, x, params, kw, loss, smoothing, mode, env))
                    except Exception as e:  # noqa: BLE001 - a provider that fails is recorded, the stage goes on
                        res.add(layer=layer, loss=loss, mode=mode, provider=provider,
                                error=f"{type(e).__name__}: {e}"[:300])
                        continue
                    base = ms if provider == "reference" else base
                    f, b = flops(M, K, D, mode, loss), traffic(x, mu, M, K, mode)
                    row = dict(layer=layer, batch=x.shape[0], loss=loss, mode=mode, provider=provider,
                               ms=round(ms, 4), gflops=round(f / ms / 1e6, 1),
                               speedup_vs_reference=round(base / ms, 2) if base else None)
                    if ceil:
                        row.update(fp32_roofline=round(f / (ms / 1e3) / ceil["fp32_flops"], 3),
                                   hbm_roofline=round(b / (ms / 1e3) / ceil["hbm_bytes"], 3))
                    res.add(**row)


def geometry_out(x, kw):
    from dcgmm_fast.geometry import out_hw

    return out_hw(x.shape[1:3], kw["kernel"], kw["stride"])


def stage_sweep(res: Results, out: str) -> None:
    """The large-D layer: ieee vs tf32x3 and forward tile configurations, each config's time and error."""
    if not _cuda_or_skip(res):
        return
    from dcgmm_fast import geometry, reference
    from dcgmm_fast.triton_kernels import cgmm as tk

    inputs, G, kw = trained_inputs(LARGE_D, batch_size(1000), DEVICE)
    x, mu, sigma, log_pi = inputs
    Gd = geometry.smoothing_dense(G)
    small = [t[:8] if i == 0 else t for i, t in enumerate(inputs)]
    ref64 = reference.cgmm(*[t.double().cpu() for t in small], smoothing=Gd.double().cpu(), **kw)
    ref32 = reference.cgmm(*[t.float().cpu() for t in small], smoothing=Gd.float().cpu(), **kw)
    K, D = mu.shape[-2], mu.shape[-1]
    for precision in tk.PRECISIONS:
        for block_r, warps in ((16, 4), (32, 4), (32, 8), (64, 8), (128, 8)):
            config = (False, block_r, max(16, 1 << (K - 1).bit_length()), 32, warps)
            k, s = geometry.pair(kw["kernel"]), geometry.pair(kw["stride"])
            try:
                run = lambda: tk.cgmm_fwd(x, mu, sigma, log_pi, k, s, "mc", Gd, precision=precision,  # noqa: E731
                                          config=config)
                ms = bench_ms(run)
                o = tk.cgmm_fwd(small[0], mu, sigma, log_pi, k, s, "mc", Gd, precision=precision, config=config)
                err = max(_rule(o[i], ref64[i], ref32[i])[2] for i in range(3))
                res.add(layer=LARGE_D, precision=precision, block_r=block_r, num_warps=warps, fwd_ms=round(ms, 4),
                        worst_ratio=round(err, 3), default=config == tk.fwd_config(K, D) and precision == "ieee")
            except Exception as e:  # noqa: BLE001
                res.add(layer=LARGE_D, precision=precision, block_r=block_r, num_warps=warps,
                        error=f"{type(e).__name__}: {e}"[:300])


def stage_train(res: Results, out: str) -> None:
    """Preset D training images/s on the GPU at batch 100 and 1000: the eager ``Trainer.train_step`` and the whole
    step captured (``Trainer(compile="cudagraphs")``: the fullgraph-traced step replayed as a CUDA graph), every
    layer training, data on the device as uint8; then sampling images/s with 300 sharpening iterations."""
    if not _cuda_or_skip(res):
        return
    from dcgmm_fast import data
    from dcgmm_fast.model import DCGMM
    from dcgmm_fast.sampling import Sharpening
    from dcgmm_fast.train import History, Trainer

    ds = data.load_shipped()
    xs = (ds.x_train * 255).round().to(torch.uint8).to(DEVICE)  # uint8 on the device, scaled inside the step
    ys = ds.y_train.to(DEVICE)
    sync = torch.cuda.synchronize if not DRY else (lambda: None)
    for mode in ("eager", "cudagraphs", "eager-cuda"):
        for batch in (batch_size(100), batch_size(1000)):
            try:  # eager-cuda: the cuda backend's fused layer step (two ops per layer), eager
                model = DCGMM("D", seed=0, backend="cuda" if mode == "eager-cuda" else "triton").to(DEVICE)
                trainer = Trainer(list(model.layers), list(model.names),
                                  compile=False if mode.startswith("eager") or DRY else mode)
                h = History()
                steps = 0
                for i in range(3):  # warm-up (compiles the kernels, captures the graph)
                    lo = (i * batch) % (xs.shape[0] - batch + 1)
                    trainer.train_step(xs[lo:lo + batch], ys[lo:lo + batch], 0.5, h)
                sync()
                t = time.perf_counter()
                while time.perf_counter() - t < (0.1 if DRY else 4.0):
                    lo = (steps * batch) % (xs.shape[0] - batch + 1)
                    trainer.train_step(xs[lo:lo + batch], ys[lo:lo + batch], 0.5, h)
                    steps += 1
                sync()
                sec = time.perf_counter() - t
                h.flush()
                res.add(preset="D", mode=mode, batch=batch, steps=steps, images_per_s=round(steps * batch / sec, 1),
                        ms_per_step=round(sec / steps * 1e3, 3),
                        target_images_per_s=200000 if batch == 1000 else None)
            except Exception as e:  # noqa: BLE001  (a stage records what broke and goes on)
                res.add(preset="D", mode=mode, batch=batch, error=f"{type(e).__name__}: {str(e)[:300]}")
    try:
        model = DCGMM("D", seed=0, backend="triton").to(DEVICE)
        n = batch_size(1000)
        its = 3 if DRY else 300
        model.sample(n, sharpening=Sharpening(iterations=3))  # warm-up
        sync()
        t = time.perf_counter()
        model.sample(n, sharpening=Sharpening(iterations=its), generator=None)
        sync()
        sec = time.perf_counter() - t
        res.add(preset="D", task="sample+sharpen", iterations=its, n=n, images_per_s=round(n / sec, 1),
                target_images_per_s=2000)
    except Exception as e:  # noqa: BLE001
        res.add(preset="D", task="sample+sharpen", error=f"{type(e).__name__}: {str(e)[:300]}")


def stage_sanitizer(res: Results, out: str) -> None:
    """compute-sanitizer memcheck and racecheck on a tiny forward + backward per flag set, triton and cuda (with the
    cuda backend's fused step), at the test shapes (a tool that refuses is logged)."""
    if not _cuda_or_skip(res):
        return
    tool = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if tool is None:
        res.add(unavailable="compute-sanitizer not found")
        return
    code = (
        "import torch\nfrom dcgmm_fast import ops\n"
        "for indep in (False, True):\n"
        "  for loss, G in (('mc', ops.smoothing_matrix(9, 1.0).cuda()), ('mc', None), ('loglik', None)):\n"
        "    x = torch.rand(2, 7, 6, 2, device='cuda')\n"
        "    lead = (20, 9) if indep else (9,)\n"
        "    mu = torch.rand(*lead, 18, device='cuda', requires_grad=True)\n"
        "    s = (1 + torch.rand(*lead, 18, device='cuda')).requires_grad_()\n"
        "    lp = torch.log_softmax(torch.zeros(*lead, device='cuda'), -1).requires_grad_()\n"
        "    xg = x.clone().requires_grad_()\n"
        "    for b in BACKENDS:\n"
        "      o = ops.cgmm(xg, mu, s, lp, kernel=3, stride=1, loss=loss, smoothing=G, backend=b)\n"
        "      (o.score.sum() + o.resp.sum()).backward()\n"
        "    if 'cuda' in BACKENDS:\n"
        "      out, st = ops.cgmm_step_partials(x, mu.detach(), s.detach(), lp.detach(), kernel=3, stride=1,\n"
        "                                       loss=loss, smoothing=G, backend='cuda')\n"
        "      ops.cgmm_step_finalize(st, mu.detach(), s.detach(), lp.detach(), lp.detach(), smoothing=G,\n"
        "                             scale=0.01, steps=torch.ones(3, device='cuda'), sigma_min=0.1, sigma_max=4.0,\n"
        "                             pi_global=indep, backend='cuda')\n"
        "torch.cuda.synchronize()\nprint('ok')\n"
    )
    from dcgmm_fast import ops as _ops

    code = f"BACKENDS = {tuple(b for b in ('triton', 'cuda') if b in _ops.available_backends())!r}\n" + code
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    for check in ("memcheck", "racecheck"):
        try:
            p = subprocess.run([tool, "--tool", check, "--error-exitcode", "9", sys.executable, "-c", code],
                               capture_output=True, text=True, timeout=120, env=env)
        except subprocess.TimeoutExpired:
            res.add(tool=check, unavailable="timed out after 120 s")
            continue
        tail = (p.stdout + p.stderr)[-1500:]
        if p.returncode not in (0, 9):
            res.add(tool=check, unavailable=f"exit {p.returncode}", tail=tail)
        else:
            res.add(tool=check, clean=p.returncode == 0, tail=tail[-600:])


def stage_dispatch(res: Results, out: str) -> None:
    """The cuda backend's dispatch table from this run: a layer shape enters where the cuda backend passed the
    accuracy stage (every loss, worst ratio <= 1) and beat triton in forward + backward for every loss. Written to
    RESULTS_DIR/cuda_dispatch.json; committing it to dcgmm_fast/backends/ is what makes "auto" use it."""
    acc = res.read("accuracy")
    tim = res.read("timings")
    entries = []
    for layer, ((H, W, C), k, s, K, indep) in LAYERS.items():
        ok = [r for r in acc if r.get("layer") == layer and r.get("variant") == "cuda"]
        if not ok or not all(r.get("passes") for r in ok):
            continue
        faster = True
        for loss in ("mc", "loglik"):
            ms = {r["provider"]: r["ms"] for r in tim if r.get("layer") == layer and r.get("loss") == loss
                  and r.get("mode") == "fwd+bwd" and "ms" in r}
            faster &= "cuda" in ms and "triton" in ms and ms["cuda"] < ms["triton"]
        if faster:
            entries.append({"layer": [H, W, C, k, k, s, s, K, "independent" if indep else "shared"],
                            "verified": f"{out}/results.jsonl (accuracy, timings)"})
    device = next((r.get("device") for r in res.read("env") if r.get("device")), None)
    table = {"about": "written by bench/gpu_check.py stage dispatch", "measured_on": device, "entries": entries}
    with open(os.path.join(out, "cuda_dispatch.json"), "w") as f:
        json.dump(table, f, indent=2)
    res.add(entries=len(entries), layers=[e["layer"] for e in entries])


def stage_summary(res: Results, out: str) -> None:
    rows = [json.loads(line) for line in open(res.path)] if os.path.exists(res.path) else []
    by = {}
    for r in rows:
        by.setdefault(r["stage"], []).append(r)
    lines = ["# GPU check", "", f"- written: {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"- command: `bash bench/gpu_check.sh {out}`", ""]
    for r in by.get("env", []):
        lines.append("- environment: " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("stage", "time")))
    for r in by.get("ceilings", []):
        if "fp32_flops" in r:
            lines.append(f"- measured ceilings: fp32 {r['fp32_flops'] / 1e12:.1f} TFLOP/s (TF32 off), "
                         f"copy {r['hbm_bytes'] / 1e12:.2f} TB/s")
    for name in ("build", "tests", "accuracy", "timings", "sweep", "train", "sanitizer", "dispatch"):
        part = by.get(name, [])
        lines += ["", f"## {name}", ""]
        if not part:
            lines.append("(no results: the stage did not run or did not finish)")
            continue
        keys = [k for k in part[0] if k not in ("stage", "time", "tail")]
        for r in part[1:]:
            keys += [k for k in r if k not in keys and k not in ("stage", "time", "tail")]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for r in part:
            lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


STAGES = {"env": stage_env, "build": stage_build, "ceilings": stage_ceilings, "tests": stage_tests,
          "accuracy": stage_accuracy, "timings": stage_timings, "sweep": stage_sweep, "train": stage_train,
          "sanitizer": stage_sanitizer, "dispatch": stage_dispatch, "summary": stage_summary}


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in STAGES:
        print(f"usage: python3 bench/gpu_check.py {{{'|'.join(STAGES)}}} RESULTS_DIR", file=sys.stderr)
        return 2
    stage, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    STAGES[stage](Results(out, stage), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
