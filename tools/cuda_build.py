"""Build and check the torch-free CUDA library ``libdcgmm_cuda.so`` from ``csrc/cuda/*.cu`` (issue 23).

    python tools/cuda_build.py build [--out DIR]     # what setup.py runs when nvcc is found
    python tools/cuda_build.py check [--arch sm_80 sm_90a] [--jobs N]
                                                     # CI: -Xptxas -v per file, a table of registers / shared
                                                     # memory / stack / spills per kernel; exit 1 on any spill,
                                                     # compiler warning or a Hopper kernel without warpgroup MMA

Needs only nvcc (no torch, no GPU): the library links the CUDA runtime statically, so it loads anywhere and
reports "no CUDA device" at run time where there is none. ``DCGMM_NVCC`` names another nvcc;
``DCGMM_CUDA_ARCHS`` (e.g. "sm_90a") narrows the build to fewer architectures.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
LIBRARY = "libdcgmm_cuda.so"
#: sm_80 and sm_90a SASS plus compute_90 PTX (later GPUs JIT it)
GENCODE = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a",
           "compute_90": "arch=compute_90,code=compute_90"}
#: files whose sm_90a SASS must hold warpgroup MMA (HGMMA) instructions
WGMMA_FILES = ("cgmm_wgmma.cu",)


def nvcc() -> Optional[str]:
    """The nvcc to use: DCGMM_NVCC, else PATH, else /usr/local/cuda/bin/nvcc; None when there is none."""
    env = os.environ.get("DCGMM_NVCC")
    if env:
        return env if os.path.exists(env) else None
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))


def base_flags() -> List[str]:
    return ["-std=c++17", "-O3", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{CUDA_DIR}", "-Xcompiler", "-fPIC",
            "-Werror", "all-warnings"]


def archs() -> List[str]:
    env = os.environ.get("DCGMM_CUDA_ARCHS", "").split()
    return env or list(GENCODE)


def _gencode(names) -> List[str]:
    out = []
    for name in names:
        out += ["-gencode", GENCODE[name]]
    return out


def build(out_dir: str, jobs: int = 2) -> str:
    """Compiles every .cu (in parallel) and links ``out_dir/libdcgmm_cuda.so``; returns its path.
    Raises RuntimeError with nvcc's output on failure."""
    exe = nvcc()
    if exe is None:
        raise RuntimeError("nvcc not found (set DCGMM_NVCC or put nvcc on PATH)")
    tmp = os.path.join(out_dir, ".cuda_build")
    os.makedirs(tmp, exist_ok=True)
    gencode = _gencode(archs())

    def compile_one(src: str) -> str:
        obj = os.path.join(tmp, os.path.basename(src) + ".o")
        cmd = [exe, *base_flags(), *gencode, "-c", src, "-o", obj]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        objs = list(pool.map(compile_one, sources()))
    target = os.path.join(out_dir, LIBRARY)
    partial = target + ".partial"
    cmd = [exe, "-shared", "-cudart", "static", *gencode, *objs, "-o", partial]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    os.replace(partial, target)  # a half-written library is never loaded
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_for_install(out_dir: str) -> Optional[str]:
    """What setup.py runs: the library into out_dir unless DCGMM_NO_CUDA=1, nvcc is missing or the library is newer
    than every source. Never raises: a failed build is a warning (the cuda backend then says how to get it).
    Returns the library's path, or None when there is none."""
    target = os.path.join(out_dir, LIBRARY)
    if os.environ.get("DCGMM_NO_CUDA") == "1":
        return None
    if nvcc() is None or not sources():
        print("dcgmm_fast: nvcc not found, the cuda backend is not built (backend='cuda' says how to get it)",
              file=sys.stderr)
        return None
    deps = sources() + glob.glob(os.path.join(ROOT, "csrc", "**", "*.h*"), recursive=True)
    if os.path.exists(target) and os.path.getmtime(target) >= max(os.path.getmtime(f) for f in deps):
        return target
    try:
        build(out_dir, jobs=os.cpu_count() or 2)
    except Exception as e:  # noqa: BLE001 - the install goes on without the cuda backend
        print(f"WARNING: dcgmm_fast: the CUDA library failed to build; the cuda backend is unavailable:\n{e}",
              file=sys.stderr)
        return None
    print(f"dcgmm_fast: built {target}", file=sys.stderr)
    return target


# ------------------------------------------------------------------------------------------------ check
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes cumulative stack size)?"
                   r"(?:, (\d+) bytes smem)?")


def demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str) -> List[dict]:
    """Kernels of ``-Xptxas -v`` output: name, arch, registers, smem, stack, spill stores / loads."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "registers": 0, "smem": 0, "stack": 0,
                   "spill_stores": 0, "spill_loads": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            cur["smem"] = int(m.group(4) or 0)
    return rows


def short_name(name: str) -> str:
    name = re.sub(r"dcgmm::cuda::\(anonymous namespace\)::", "", name)
    name = re.sub(r"\(.*\)$", "", name)
    return name


def check_file(src: str, arch_names: List[str]) -> Tuple[List[dict], List[str]]:
    """Compiles one file per architecture with -Xptxas -v; returns (kernel rows, problems)."""
    exe = nvcc()
    rows, problems = [], []
    for arch in arch_names:
        cmd = [exe, *base_flags(), *_gencode([arch]), "-Xptxas", "-v", "-Xptxas", "-warn-spills",
               "-Xptxas", "-warn-lmem-usage", "-c", src, "-o", os.devnull]
        r = subprocess.run(cmd, capture_output=True, text=True)
        text = r.stdout + r.stderr
        base = os.path.basename(src)
        if r.returncode != 0:
            errors = [line for line in text.splitlines() if "error" in line.lower()]
            problems.append(f"{base} ({arch}): nvcc failed\n" + "\n".join(errors or text.splitlines()[-20:]))
        for line in text.splitlines():
            if "warning" in line.lower():
                problems.append(f"{base} ({arch}): {line.strip()}")
        found = parse_ptxas(text)
        for row in found:
            row["file"] = base
            if row["spill_stores"] or row["spill_loads"]:
                problems.append(f"{base} ({arch}): {row['name']} spills {row['spill_stores']} B / "
                                f"{row['spill_loads']} B")
        rows += found
        if base in WGMMA_FILES and arch == "sm_90a":
            problems += _check_wgmma(exe, src)
    return rows, problems


def _check_wgmma(exe: str, src: str) -> List[str]:
    """The Hopper kernel's sm_90a code holds warpgroup MMA: HGMMA in the SASS (cuobjdump, when installed), else
    wgmma.mma_async in the PTX that ptxas then compiled for sm_90a without a serialisation warning."""
    base = os.path.basename(src)
    tmp = os.path.join("/tmp", f"dcgmm_wgmma_{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    cubin = os.path.join(tmp, "k.cubin")
    r = subprocess.run([exe, *base_flags(), "-cubin", "-arch=sm_90a", src, "-o", cubin], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return [f"{base}: cubin failed\n{r.stderr}"]
    tool = shutil.which("cuobjdump") or (os.path.join(os.path.dirname(exe), "cuobjdump")
                                        if os.path.exists(os.path.join(os.path.dirname(exe), "cuobjdump")) else None)
    if tool:
        sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
        print(f"  {base}: {sass.count('HGMMA')} HGMMA instructions in the sm_90a SASS (cuobjdump)")
        return [] if "HGMMA" in sass else [f"{base}: no HGMMA instruction in the sm_90a SASS"]
    ptx = os.path.join(tmp, "k.ptx")
    subprocess.run([exe, *base_flags(), "-ptx", "-arch=sm_90a", src, "-o", ptx], capture_output=True, text=True)
    text = open(ptx).read() if os.path.exists(ptx) else ""
    n = text.count("wgmma.mma_async")
    print(f"  {base}: {n} wgmma.mma_async in the sm_90a PTX, compiled by ptxas for sm_90a "
          "(cuobjdump not installed: SASS not read)")
    return [] if n else [f"{base}: no wgmma.mma_async in the sm_90a PTX"]


def check(arch_names: List[str], jobs: int) -> int:
    exe = nvcc()
    if exe is None:
        print("cuda check: nvcc not found (set DCGMM_NVCC or put nvcc on PATH)")
        return 1
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"cuda check: {exe}, {version}")
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(lambda s: check_file(s, arch_names), sources()))
    rows = [r for rs, _ in results for r in rs]
    problems = [p for _, ps in results for p in ps]
    names = demangle([r["name"] for r in rows])
    print(f"{'file':<16} {'arch':<7} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel")
    for r in rows:
        print(f"{r['file']:<16} {r['arch']:<7} {r['registers']:>4} {r['smem']:>6} {r['stack']:>5} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<5}  {short_name(names[r['name']])}")
    for p in problems:
        print("PROBLEM:", p)
    print(f"cuda check: {len(rows)} kernels, {len(problems)} problems")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=os.path.join(ROOT, "dcgmm_fast"))
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    c = sub.add_parser("check")
    c.add_argument("--arch", nargs="+", default=["sm_80", "sm_90a"], choices=["sm_80", "sm_90a"])
    c.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        try:
            print(build(args.out, args.jobs))
        except RuntimeError as e:
            print(f"cuda build failed: {e}", file=sys.stderr)
            return 1
        return 0
    return check(args.arch, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
