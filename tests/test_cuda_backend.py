"""The cuda backend's plumbing, checked where no GPU is (issue 23): its custom ops are registered at import with
fakes (shape checks on meta tensors), the torch-free library loads and refuses bad arguments with a message and
reports "no CUDA device" instead of crashing, "auto" takes it only for the shapes of cuda_dispatch.json, and the
compile checker reads ptxas's report. Its kernels against the float64 reference run on a GPU, in
tests/test_backends.py ("cuda@cuda"), tests/test_step_ops.py and the warpgroup-MMA test here.
"""
import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

from dcgmm_fast import backends, geometry, ops, reference
from dcgmm_fast.backends import cuda as cuda_backend

from conftest import make_inputs, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB_BUILT = os.path.exists(cuda_backend.library_path())
HAS_GPU = torch.cuda.is_available() and cuda_backend.problem() is None


def test_ops_are_registered_with_their_schemas_on_any_machine():
    for name in ("cgmm_fwd_cuda", "cgmm_bwd_cuda", "cgmm_step_partials_cuda", "cgmm_step_finalize_cuda"):
        assert hasattr(torch.ops.dcgmm, name), name
    schema = str(torch.ops.dcgmm.cgmm_fwd_cuda.default._schema)
    assert schema.startswith("dcgmm::cgmm_fwd_cuda(Tensor x, Tensor mu, Tensor sigma, Tensor log_pi,")


def test_fakes_give_the_output_shapes_on_meta_tensors():
    """The fakes (what torch.compile traces) for every op, independent and shared mode."""
    meta = torch.device("meta")
    for lead in ((9,), (36, 9)):  # shared (K,), independent (P, K) with P = 6 x 6 positions of 8x8 under 3x3
        x = torch.empty(4, 8, 8, 2, device=meta)
        mu = torch.empty(*lead, 18, device=meta)
        log_pi = torch.empty(*lead, device=meta)
        resp, score, lse, kstar = torch.ops.dcgmm.cgmm_fwd_cuda(x, mu, mu, log_pi, [3, 3], [1, 1], "mc", None)
        assert resp.shape == (4, 6, 6, 9) and score.shape == lse.shape == kstar.shape == (4, 6, 6)
        assert kstar.dtype == torch.int32
        *_, stats = torch.ops.dcgmm.cgmm_step_partials_cuda(x, mu, mu, log_pi, [3, 3], [1, 1], "loglik", None)
        assert stats.shape == ((36 if len(lead) == 2 else 1), 9, 37) and stats.dtype == torch.float64
        new = torch.ops.dcgmm.cgmm_step_finalize_cuda(stats, mu, mu, log_pi, log_pi, None, 0.01,
                                                     torch.empty(3, device=meta), 0.1, 4.0, False)
        assert [t.shape for t in new] == [mu.shape, mu.shape, log_pi.shape, (2,)]
        dx, dmu, dsigma, dlp = torch.ops.dcgmm.cgmm_bwd_cuda(None, score, x, mu, mu, log_pi, [3, 3], [1, 1], "mc",
                                                             None, resp, lse, kstar, True, True)
        assert dx.shape == x.shape and dmu.shape == mu.shape and dlp.shape == log_pi.shape


def test_fakes_on_fake_cuda_tensors():
    """What torch.compile sees on a GPU machine: fake CUDA tensors (no GPU needed) through every op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 8, 8, 1, device="cuda")
        mu, log_pi = torch.empty(36, 16, 9, device="cuda"), torch.empty(36, 16, device="cuda")
        out = torch.ops.dcgmm.cgmm_fwd_cuda(x, mu, mu, log_pi, [3, 3], [1, 1], "loglik", None)
        assert [t.device.type for t in out] == ["cuda"] * 4 and out[0].shape == (4, 6, 6, 16)
        *_, stats = torch.ops.dcgmm.cgmm_step_partials_cuda(x, mu, mu, log_pi, [3, 3], [1, 1], "mc", None)
        assert stats.shape == (36, 16, 19) and stats.device.type == "cuda"
        new = torch.ops.dcgmm.cgmm_step_finalize_cuda(stats, mu, mu, log_pi, log_pi, None, 0.01,
                                                     torch.empty(3, device="cuda"), 0.1, 4.0, True)
        assert [t.shape for t in new] == [mu.shape, mu.shape, log_pi.shape, (2,)]


def test_the_forward_differentiates_through_the_registered_autograd():
    """Autograd is wired (register_autograd): a meta forward's score has a grad_fn."""
    meta = torch.device("meta")
    x = torch.empty(2, 6, 6, 1, device=meta)
    mu = torch.empty(9, 9, device=meta, requires_grad=True)
    out = torch.ops.dcgmm.cgmm_fwd_cuda(x, mu, mu, torch.empty(9, device=meta), [3, 3], [1, 1], "mc", None)
    assert out[1].grad_fn is not None


@pytest.mark.skipif(not LIB_BUILT, reason="libdcgmm_cuda.so is not built here (no nvcc)")
def test_library_loads_without_a_gpu_and_says_so():
    if HAS_GPU:
        pytest.skip("a GPU is here")
    why = cuda_backend.problem()
    assert why is not None and "no CUDA device" in why and "use backend=" in why
    with pytest.raises(ops.BackendNotAvailable, match="no CUDA device"):
        backends.resolve("cuda", torch.device("cpu"))


@pytest.mark.skipif(not LIB_BUILT, reason="libdcgmm_cuda.so is not built here (no nvcc)")
def test_library_refuses_bad_arguments_with_a_message():
    """Argument errors come back as cudaErrorInvalidValue (1) with the reason, before any CUDA call."""
    lib = cuda_backend._load()
    assert lib.dcgmm_cuda_abi_version() == cuda_backend.ABI_VERSION
    shape = cuda_backend.Shape(2, 8, 8, 1, 64, 8, 3, 3, 1, 1, 200, 0)
    assert lib.dcgmm_cuda_workspace_bytes(ctypes.byref(shape), cuda_backend.WS_FORWARD) == -1
    err = lib.dcgmm_cgmm_fwd(ctypes.byref(shape), *([None] * 4), 1, None, 0, *([None] * 5), 0, None)
    assert err == 1 and "K" in lib.dcgmm_cuda_error_string(err).decode()
    shape.K = 9
    assert lib.dcgmm_cuda_workspace_bytes(ctypes.byref(shape), cuda_backend.WS_FORWARD) > 0
    err = lib.dcgmm_cgmm_fwd(ctypes.byref(shape), ctypes.c_void_p(256), *([None] * 3), 1, ctypes.c_void_p(512), 4,
                             *([None] * 5), 0, None)
    assert err == 1 and "n * n == K" in lib.dcgmm_cuda_error_string(err).decode()
    err = lib.dcgmm_cgmm_fwd(ctypes.byref(shape), ctypes.c_void_p(256), *([None] * 3), 1, ctypes.c_void_p(512), 3,
                             *([None] * 5), 0, None)
    assert err == 1 and "workspace" in lib.dcgmm_cuda_error_string(err).decode()
    shape.kh = 9
    err = lib.dcgmm_cgmm_bwd(ctypes.byref(shape), None, None, 0, *([None] * 4), 1, None, 0, None, None, 1, 1,
                             *([None] * 5), 0, None)
    assert err == 1 and "kernel" in lib.dcgmm_cuda_error_string(err).decode()


def test_ctypes_signatures_match_the_header():
    """Every entry point's argument types in cuda.py against its prototype in csrc/cuda/dcgmm_cuda.h (a count or type
    slip would shift every argument of the call on the GPU)."""
    import re

    header = open(os.path.join(ROOT, "csrc", "cuda", "dcgmm_cuda.h")).read()
    header = re.sub(r"//[^\n]*", "", header)
    kinds = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "double": ctypes.c_double, "float": ctypes.c_float}
    for name, (args, res) in cuda_backend._SIGNATURES.items():
        m = re.search(r"\b(\w[\w\s\*]*?)\s*\b" + name + r"\s*\(([^)]*)\)", header)
        assert m, f"{name} is not declared in dcgmm_cuda.h"
        params = [p.strip() for p in m.group(2).replace("\n", " ").split(",") if p.strip() and p.strip() != "void"]
        assert len(params) == len(args), f"{name}: {len(params)} parameters in the header, {len(args)} in cuda.py"
        for p, a in zip(params, args):
            if "*" in p:
                assert a in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(a, ctypes._Pointer), (name, p, a)
            else:
                assert a is kinds[p.rsplit(" ", 1)[0].replace("const ", "").strip()], (name, p, a)


def test_unbuilt_library_says_how_to_build_it(tmp_path):
    code = ("import os; os.environ['DCGMM_CUDA_LIB'] = os.path.join(%r, 'missing.so');"
            "from dcgmm_fast.backends import cuda; print(cuda.problem())" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and "nvcc" in out.stdout and "cuda_build.py" in out.stdout


# ---------------------------------------------------------------------------------------- auto dispatch
def test_dispatch_table_is_well_formed():
    with open(os.path.join(ROOT, "dcgmm_fast", "backends", "cuda_dispatch.json")) as f:
        table = json.load(f)
    for entry in table["entries"]:
        layer = entry["layer"]
        assert len(layer) == 9 and layer[8] in ("shared", "independent") and all(isinstance(v, int)
                                                                                  for v in layer[:8])
        assert entry.get("verified"), "an entry without its GPU check record"
    assert isinstance(backends.cuda_dispatch(), frozenset)


def test_auto_takes_cuda_only_for_listed_shapes(monkeypatch):
    listed = (28, 28, 1, 3, 3, 1, 1, 25, "shared")
    monkeypatch.setattr(backends, "cuda_dispatch", lambda: frozenset({listed}))
    real_problem = backends.problem
    monkeypatch.setattr(backends, "problem", lambda name: None if name in ("cuda", "triton") else real_problem(name))
    gpu = torch.device("cuda")
    assert backends.resolve_layer("auto", gpu, listed) == "cuda"
    assert backends.resolve_layer("auto", gpu, listed[:7] + (49, "shared")) == "triton"
    assert backends.resolve_layer("triton", gpu, listed) == "triton"  # a named backend is kept
    monkeypatch.setenv("DCGMM_BACKEND", "triton")
    assert backends.resolve_layer("auto", gpu, listed) == "triton"
    assert backends.resolve_layer("auto", torch.device("cpu"), listed) != "cuda"


# ---------------------------------------------------------------------------------------- the build
def _cuda_build():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import cuda_build

    return cuda_build


def test_a_failing_nvcc_warns_and_does_not_fail_the_install(tmp_path, monkeypatch, capsys):
    cuda_build = _cuda_build()
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'nvcc: fatal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DCGMM_NVCC", str(fake))
    assert cuda_build.build_for_install(str(tmp_path)) is None
    assert "WARNING" in capsys.readouterr().err and not (tmp_path / cuda_build.LIBRARY).exists()
    monkeypatch.setenv("DCGMM_NVCC", str(tmp_path / "absent"))
    assert cuda_build.build_for_install(str(tmp_path)) is None
    assert "nvcc not found" in capsys.readouterr().err


def test_ptxas_report_is_parsed():
    cuda_build = _cuda_build()

    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 600 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 360 bytes cmem[0]
"""
    rows = cuda_build.parse_ptxas(text)
    assert [(r["name"], r["arch"], r["registers"], r["smem"], r["spill_stores"]) for r in rows] == [
        ("_Z3fooPf", "sm_90a", 168, 1024, 4), ("_Z3barv", "sm_80", 32, 0, 0)]


# ---------------------------------------------------------------------------------------- on a Hopper GPU
@pytest.mark.skipif(not HAS_GPU or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("case", [((26, 26, 25), 4, 2, 100, "mc", 3.5), ((12, 12, 25), 12, 1, 49, "mc", None),
                                  ((28, 28, 1), 3, 1, 25, "loglik", None), ((13, 13, 25), 4, 1, 25, "mc", 1.5)])
def test_wgmma_forward_within_design_rule(case, monkeypatch, fresh_seed):
    """The warpgroup-MMA 3xTF32 forward (DCGMM_CUDA_FORWARD=wgmma) against float64: the 4x rule, NaN-poisoned."""
    (H, W, C), k, s, K, loss, som = case
    monkeypatch.setenv("DCGMM_POISON", "1")
    monkeypatch.setenv("DCGMM_CUDA_FORWARD", "wgmma")
    x, mu, sigma, log_pi = make_inputs(8, H, W, C, k, s, K, False, seed=fresh_seed)
    G = None if som is None else geometry.smoothing_factors(K, som, dtype=torch.float64)
    kw = dict(kernel=k, stride=s, loss=loss)
    ref = reference.cgmm(x, mu, sigma, log_pi, smoothing=G, **kw)
    c32 = [t.float() for t in (x, mu, sigma, log_pi)]
    ref32 = reference.cgmm(*c32, smoothing=None if G is None else G.float(), **kw)
    got = ops.cgmm(*[t.cuda() for t in c32], smoothing=None if G is None else G.float().cuda(), backend="cuda", **kw)
    for name, a, b, c in zip(("resp", "score", "lse"), got[:3], ref[:3], ref32[:3]):
        assert rel_err(a.cpu().double(), b) <= 4 * rel_err(c.double(), b) + 1e-6, name


# ---------------------------------------------------------------------------------------- marshalling, no GPU
class _FakeLib:
    """Stands in for libdcgmm_cuda.so: checks each call against the ctypes signature (count and, through ctypes'
    own conversion, types) and records it; returns success without touching memory."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        args_t, _ = cuda_backend._SIGNATURES[name]

        def call(*args):
            assert len(args) == len(args_t), f"{name}: {len(args)} arguments, the signature has {len(args_t)}"
            for a, t in zip(args, args_t):
                if a is not None and not isinstance(a, (ctypes.c_void_p, ctypes._Pointer, ctypes.Structure)) \
                        and not hasattr(a, "_obj"):
                    t(a)  # raises for a value ctypes cannot convert to the declared type
            self.calls.append((name, args))
            return 64 if name == "dcgmm_cuda_workspace_bytes" else 0

        return call


@pytest.fixture
def fake_lib(monkeypatch):
    """The op bodies run on CPU tensors against _FakeLib: the device checks, guard and stream are bypassed."""
    import contextlib

    lib = _FakeLib()
    monkeypatch.setattr(cuda_backend, "_load", lambda: lib)
    monkeypatch.setattr(cuda_backend, "_check", lambda t, name: None)
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: ctypes.c_void_p(0))
    monkeypatch.setattr(cuda_backend, "_use_wgmma", lambda mu, x: False)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return lib


def test_every_op_marshals_its_arguments_as_the_abi_declares(fake_lib):
    x, mu, sigma, log_pi = [t.float() for t in make_inputs(2, 8, 8, 1, 3, 1, 25, True)]
    G = geometry.smoothing_factors(25, 1.0)
    fwd = cuda_backend.cgmm_fwd_cuda._init_fn(x, mu, sigma, log_pi, [3, 3], [1, 1], "mc", G)
    name, args = fake_lib.calls[-1]
    assert name == "dcgmm_cgmm_fwd" and args[7] == 5  # the factors go as they are: n = 5
    assert args[0]._obj.K == 25 and args[0]._obj.independent == 1 and args[0]._obj.stride_h == 8
    resp, score, lse, kstar = fwd
    cuda_backend.cgmm_bwd_cuda._init_fn(None, torch.full((), 0.1).expand(score.shape), x, mu, sigma, log_pi,
                                        [3, 3], [1, 1], "mc", G, resp, lse, kstar, True, True)
    name, args = fake_lib.calls[-1]
    assert name == "dcgmm_cgmm_bwd" and args[3] == 1 and args[10] == 5  # g_score read once; factors
    *_, stats = cuda_backend.cgmm_step_partials_cuda._init_fn(x, mu, sigma, log_pi, [3, 3], [1, 1], "loglik", G)
    name, args = fake_lib.calls[-1]
    assert name == "dcgmm_cgmm_step_partials" and args[6] is None and stats.shape == (36, 25, 19)
    cuda_backend.cgmm_step_finalize_cuda._init_fn(stats, mu, sigma, log_pi, log_pi, G, 0.01, torch.ones(3), 0.1,
                                                  4.0, True)
    name, args = fake_lib.calls[-1]
    assert name == "dcgmm_cgmm_step_finalize" and args[0]._obj.H == 36 and args[0]._obj.C == 9
