"""Compile every Triton kernel ahead of time for sm_80 and sm_90, for the configs the launchers can pick, and
fail on any register spill (cuobjdump's STACK must be 0). Prints registers, stack and shared memory per kernel.

    TRITON_INTERPRET=0 python tools/triton_aot_check.py [--archs 80 90] [--json out.json]

Needs no GPU: ptxas and cuobjdump come with the Triton wheel. Run with the interpreter off (CI runs it in a
subprocess of its own) and with each Triton version the project supports (3.6 on the GPU box, 3.7.1 in CI).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import importlib.util  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# the kernel file itself, so the check runs in any environment with torch and triton (no dcgmm_fast install)
_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "triton_kernels", "cgmm.py")
_spec = importlib.util.spec_from_file_location("dcgmm_triton_cgmm", _KERNELS)
tk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tk)

I32, F32, P32, P64, PI32 = "i32", "fp32", "*fp32", "*fp64", "*i32"
ROW_SHAPES = ["H", "W", "C", "Wo", "P", "K", "D", "KWC", "sh", "sw", "ROWS", "TILES"]


def configs():
    """(kernel, signature, constexprs, num_warps) for every config the launchers can choose (tk._blocks)."""
    out = []
    rows = {n: I32 for n in ROW_SHAPES}
    for block_k in (16, 32):
        for use_dot in ((False, True) if block_k == 32 else (False,)):
            block_d = 16 if use_dot else 8
            block_r = 16
            for is_mc, smooth in ((True, True), (True, False), (False, False)):
                sig = {n: P32 for n in ("resp_ptr", "score_ptr", "lse_ptr")}
                sig.update(kstar_ptr=PI32, x_ptr=P32, a_ptr=P32, b_ptr=P32, c_ptr=P32, ctr_ptr=P32, g_ptr=P32)
                sig.update(rows, const=F32)
                const = dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d, INDEP=True, IS_MC=is_mc,
                             HAS_SMOOTHING=smooth, USE_DOT=use_dot)
                out.append((tk._cgmm_fwd_kernel, sig, const, tk._num_warps(use_dot)))
        for is_mc, smooth in ((True, True), (True, False), (False, False)):
            flags = dict(INDEP=True, IS_MC=is_mc, HAS_SMOOTHING=smooth, HAS_G_RESP=True, HAS_G_SCORE=True)
            sig = dict(pw_ptr=P32, pa1_ptr=P32, pa2_ptr=P32, w_ptr=P32, resp_ptr=P32, g_resp_ptr=P32,
                       g_score_ptr=P32, kstar_ptr=PI32, g_ptr=P32, x_ptr=P32, **rows)
            out.append((tk._cgmm_bwd_param_kernel, sig,
                        dict(BLOCK_R=tk.BWD_BLOCK_R, BLOCK_K=block_k, BLOCK_D=tk.BWD_BLOCK_D, STORE_W=True,
                             **flags), 4))
    sig = dict(dpatch_ptr=P32, w_ptr=P32, x_ptr=P32, s2mu_ptr=P32, s2_ptr=P32, **rows)
    out.append((tk._cgmm_bwd_x_kernel, sig, dict(BLOCK_R=tk.BWD_BLOCK_R, BLOCK_K=tk.BWD_X_BLOCK_K,
                                                  BLOCK_D=tk.BWD_BLOCK_D, INDEP=True), 4))
    for block_k in (16, 32, 64, 128, 256):
        sig = dict(out_ptr=P32, topdown_ptr=P32, mu_ptr=P32, sigma_ptr=P32, u_ptr=P32, eps_ptr=P32, ROWS=I32, P=I32,
                   K=I32, D=I32, top_s=I32, divisor=F32, sigma_ceiling=F32)
        out.append((tk._sample_kernel, sig, dict(INDEP=True, BLOCK_K=block_k, BLOCK_D=64), 4))
    for average in (True, False):
        sig = dict(out_ptr=P32, v_ptr=P32, **{n: I32 for n in ("NPIX", "H", "W", "C", "Ho", "Wo", "kh", "kw", "sh",
                                                              "sw", "D")})
        out.append((tk._fold_kernel, sig, dict(AVERAGE=average, BLOCK=1024), 4))
    return out


def cuobjdump():
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else "cuobjdump"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows, failed = [], 0
    for arch in args.archs:
        for fn, sig, const, warps in configs():
            sig = {**sig, **{k: "constexpr" for k in const}}
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
            name = f"{fn.__name__}[{','.join(f'{k}={v}' for k, v in const.items())}]"
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            except Exception as e:  # a kernel that does not compile is a failure too
                print(f"sm_{arch} {name}: COMPILE FAILED: {type(e).__name__}: {str(e)[:300]}")
                failed += 1
                continue
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                dump = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                      text=True).stdout
            usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", dump)}
            row = dict(arch=f"sm_{arch}", kernel=name, num_warps=warps, **usage)
            rows.append(row)
            bad = usage.get("STACK", -1) != 0 or usage.get("LOCAL", 0) != 0
            failed += bad
            print(f"{'SPILL ' if bad else ''}sm_{arch} warps={warps} REG={usage.get('REG')} STACK={usage.get('STACK')} "
                  f"SHARED={usage.get('SHARED')} {name}", flush=True)
    print(f"triton {triton.__version__}: {len(rows)} compiled, {failed} failed or spilled")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
