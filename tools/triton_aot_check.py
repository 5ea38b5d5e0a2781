"""Compile every Triton kernel variant the launchers can pick, ahead of time for sm_80 and sm_90, and fail on any
register spill (cuobjdump's STACK/LOCAL must be 0) or compile error. Prints registers, stack and shared memory.

    TRITON_INTERPRET=0 python tools/triton_aot_check.py [--archs 80 90] [--json out.json] [--jobs 2]

Needs no GPU: ptxas and cuobjdump come with the Triton wheel. The kernels are imported as the package ships them
(``dcgmm_fast.triton_kernels``; install the package, e.g. ``DCGMM_NO_EXTENSION=1 pip install --no-deps -e .``),
their signatures are read from the kernels themselves, and the tile sizes come from the launchers' own config
functions (``fwd_config``, ``bwd_config``) over every flag combination: shared and independent, mc with and
without a smoothing and loglik, with and without upstream gradients, ieee and tf32x3. Run it with each Triton
version the project supports (3.6 on the GPU box, 3.7.1 in CI).
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from dcgmm_fast.triton_kernels import cgmm as tk  # noqa: E402
from dcgmm_fast.triton_kernels import cgmm_v1 as tk1  # noqa: E402

_FLOAT_SCALARS = {"const", "divisor", "sigma_ceiling"}
_INT32_POINTERS = {"kstar_ptr"}


def signature(fn, constexprs):
    """Types of a kernel's arguments from their names: ``*_ptr`` float32 pointers (kstar int32), the float
    scalars by name, every other runtime argument int32; ``constexprs`` as given."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in _INT32_POINTERS else "*fp32"
        else:
            sig[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return sig


FLAG_SETS = [dict(IS_MC=True, HAS_SMOOTHING=True), dict(IS_MC=True, HAS_SMOOTHING=False),
             dict(IS_MC=False, HAS_SMOOTHING=False)]


def configs():
    """(kernel, constexprs, num_warps) for every variant the launchers can choose."""
    out = []
    # forward: K over every register-tile width, D on both sides of the direct/GEMM switch
    for K, D, indep, flags in itertools.product((16, 32, 64, 128), (9, 400), (False, True), FLAG_SETS):
        direct, block_r, block_k, block_d, warps = tk.fwd_config(K, D)
        for precision in (("ieee",) if direct else tk.PRECISIONS):
            const = dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, INDEP=indep, DIRECT=direct,
                         PRECISION=precision, **flags)
            out.append((tk._cgmm_fwd_kernel, const, warps))
    # backward: W per flag set and component tile
    for flags, g_resp, g_score, K in itertools.product(FLAG_SETS, (False, True), (False, True), (16, 32)):
        block_k = min(32, max(16, triton.next_power_of_2(K)))
        out.append((tk._cgmm_bwd_w_kernel, dict(BLOCK_R=tk.BWD_BLOCK_R, BLOCK_K=block_k, HAS_G_RESP=g_resp,
                                                HAS_G_SCORE=g_score, **flags), 4))
    seen = set()
    for K, D, indep, precision in itertools.product((16, 32, 64), (9, 32, 400), (False, True), tk.PRECISIONS):
        (block_k, block_d, warps), (block_kx, block_dx) = tk.bwd_config(K, D)
        direct = D <= tk.DIRECT_MAX_D
        key = (block_k, block_d, indep, precision, direct)
        if key not in seen:
            seen.add(key)
            out.append((tk._cgmm_bwd_param_kernel, dict(INDEP=indep, CHUNK_ROWS=tk.CHUNK_ROWS, BLOCK_R=tk.PARAM_BLOCK_R,
                                                         BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision,
                                                         DIRECT=direct), warps))
        if ("x", indep, block_kx, block_dx) not in seen:
            seen.add(("x", indep, block_kx, block_dx))
            out.append((tk._cgmm_bwd_x_kernel, dict(BLOCK_R=tk.BWD_BLOCK_R, BLOCK_K=block_kx, BLOCK_D=block_dx,
                                                    INDEP=indep), 4))
    for direct in (False, True):
        out.append((tk._cgmm_bwd_finalize_kernel, dict(BLOCK=256, DIRECT=direct), 4))
    for block_k in (16, 32, 64, 128, 256):
        out.append((tk._sample_kernel, dict(INDEP=True, BLOCK_K=block_k, BLOCK_D=64), 4))
        out.append((tk._sample_kernel, dict(INDEP=False, BLOCK_K=block_k, BLOCK_D=64), 4))
    for average in (True, False):
        out.append((tk._fold_kernel, dict(AVERAGE=average, BLOCK=1024), 4))
    # the first-generation forward (DCGMM_TRITON_KERNELS=v1, and K > 128): its launcher's tiles
    for K, D, indep, flags in itertools.product((16, 32, 200), (9, 400), (False, True), FLAG_SETS):
        geo = dict(K=K, D=D)
        block_r, block_k, block_d, use_dot = tk1._blocks(geo)
        const = dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, INDEP=indep, USE_DOT=use_dot, **flags)
        out.append((tk1._cgmm_fwd_kernel, const, tk1._num_warps(use_dot)))
    return out


def cuobjdump():
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else "cuobjdump"


def _kernel(module, name):
    return getattr(tk if module == "cgmm" else tk1, name)


def compile_one(job):
    """(arch, module, kernel name, constexprs, warps) -> a result row (runs in a worker process)."""
    arch, module, fn_name, const, warps = job
    fn = _kernel(module, fn_name)
    src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, const), constexprs=const)
    name = f"{module}.{fn_name}[{','.join(f'{k}={v}' for k, v in const.items())}]"
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    except Exception as e:  # a kernel that does not compile is a failure too
        return dict(arch=f"sm_{arch}", kernel=name, num_warps=warps, error=f"{type(e).__name__}: {str(e)[:300]}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        dump = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", dump)}
    return dict(arch=f"sm_{arch}", kernel=name, num_warps=warps, **usage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    parser.add_argument("--json", default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    jobs = [(arch, "cgmm" if fn.__module__.endswith(".cgmm") else "cgmm_v1", fn.__name__, const, warps)
            for arch in args.archs for fn, const, warps in configs()]
    rows, failed = [], 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(compile_one, jobs):
            rows.append(row)
            if "error" in row:
                failed += 1
                print(f"{row['arch']} {row['kernel']}: COMPILE FAILED: {row['error']}", flush=True)
                continue
            bad = row.get("STACK", -1) != 0 or row.get("LOCAL", 0) != 0
            failed += bad
            print(f"{'SPILL ' if bad else ''}{row['arch']} warps={row['num_warps']} REG={row.get('REG')} "
                  f"STACK={row.get('STACK')} SHARED={row.get('SHARED')} {row['kernel']}", flush=True)
    print(f"triton {triton.__version__}: {len(rows)} compiled, {failed} failed or spilled")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
