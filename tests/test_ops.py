"""dcgmm_fast.ops: argument checks that name the argument, backend plumbing, dispatch to the reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dcgmm_fast import backends, ops, reference

from conftest import make_inputs


def _good(**over):
    x, mu, sigma, log_pi = make_inputs(2, 7, 6, 1, 3, 1, 9, dtype=torch.float32, seed=1)
    kw = dict(x=x, mu=mu, sigma=sigma, log_pi=log_pi, kernel=3, stride=1, loss="mc", smoothing=None)
    kw.update(over)
    return kw


def _call(**over):
    kw = _good(**over)
    return ops.cgmm(kw.pop("x"), kw.pop("mu"), kw.pop("sigma"), kw.pop("log_pi"), **kw)


def test_ops_cgmm_dispatches_to_reference():
    kw = _good()
    out = _call(backend="reference")
    ref = reference.cgmm(kw["x"], kw["mu"], kw["sigma"], kw["log_pi"], kernel=3, stride=1)
    assert isinstance(out, ops.CGMMOut)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert out.resp.shape == (2, 5, 4, 9) and out.score.shape == (2, 5, 4) and out.kstar.dtype == torch.int32


x0, mu0, sigma0, log_pi0 = make_inputs(2, 7, 6, 1, 3, 1, 9, dtype=torch.float32, seed=1)
BAD = [  # (overrides, exception, the argument the message must name)
    (dict(x=x0[0]), ValueError, "x"),  # rank 3
    (dict(x=x0.numpy()), TypeError, "x"),
    (dict(x=(x0 * 255).to(torch.uint8)), TypeError, "x"),
    (dict(x=x0.permute(0, 3, 1, 2)), ValueError, "NHWC"),  # NCHW given: the window no longer fits
    (dict(mu=mu0[:, :5]), ValueError, "mu"),  # wrong D
    (dict(mu=mu0[None]), ValueError, "mu"),  # P mismatch in independent mode (1 != 20)
    (dict(mu=mu0[:8], sigma=sigma0[:8], log_pi=log_pi0[:8]), ValueError, "K"),  # 8 not square with mc
    (dict(sigma=sigma0[:, :5]), ValueError, "sigma"),
    (dict(log_pi=log_pi0[:4]), ValueError, "log_pi"),
    (dict(mu=mu0.double()), TypeError, "mu"),  # dtype mismatch
    (dict(sigma=sigma0.double()), TypeError, "sigma"),
    (dict(log_pi=log_pi0.double()), TypeError, "log_pi"),
    (dict(sigma=-sigma0), ValueError, "sigma"),  # sigma <= 0
    (dict(sigma=torch.where(torch.arange(9)[:, None] == 3, 0.0, sigma0)), ValueError, "sigma"),
    (dict(x=x0.clone().index_fill_(1, torch.tensor([2]), float("nan"))), ValueError, "x"),
    (dict(mu=mu0.clone().fill_(float("inf"))), ValueError, "mu"),
    (dict(log_pi=torch.full_like(log_pi0, float("nan"))), ValueError, "log_pi"),
    (dict(kernel=8), ValueError, "kernel"),  # larger than the 7x6 input
    (dict(kernel=(3, 7)), ValueError, "kernel"),
    (dict(kernel=0), ValueError, "kernel"),
    (dict(kernel=2.5), TypeError, "kernel"),
    (dict(stride=(1, 0)), ValueError, "stride"),
    (dict(loss="nll"), ValueError, "loss"),
    (dict(loss="loglik", smoothing=torch.eye(9)), ValueError, "smoothing"),
    (dict(smoothing=torch.eye(4)), ValueError, "smoothing"),
    (dict(smoothing=torch.eye(9, dtype=torch.float64)), TypeError, "smoothing"),
    (dict(smoothing=2 * torch.eye(9)), ValueError, "smoothing"),
    (dict(backend="fastest"), ValueError, "backend"),
]


@pytest.mark.parametrize("over,exc,name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(over, exc, name):
    with pytest.raises(exc, match=name):
        _call(**over)


def test_loglik_accepts_non_square_k_and_neg_inf_log_pi():
    x, mu, sigma, log_pi = make_inputs(1, 5, 5, 1, 2, 1, 7, dtype=torch.float32, seed=2)
    log_pi = log_pi.clone()
    log_pi[3] = -float("inf")  # a component with zero weight is legal
    out = ops.cgmm(x, mu, sigma, log_pi, kernel=2, stride=1, loss="loglik")
    assert torch.isfinite(out.score).all() and torch.all(out.resp[..., 3] == 0)


def test_independent_mode_shapes():
    x, mu, sigma, log_pi = make_inputs(2, 7, 6, 1, 3, 2, 4, independent=True, dtype=torch.float32, seed=3)
    out = ops.cgmm(x, mu, sigma, log_pi, kernel=3, stride=2)
    assert mu.shape == (3 * 2, 4, 9) and out.resp.shape == (2, 3, 2, 4)


def test_helper_ops_check_arguments():
    v = torch.rand(1, 5, 4, 9)
    with pytest.raises(ValueError, match="v"):
        ops.patch_average(v, (8, 6), 3, 1)  # (H', W') of an 8x6 image is (6, 4)
    with pytest.raises(ValueError, match="v"):
        ops.patch_average(torch.rand(1, 5, 4, 10), (7, 6), 3, 1)  # D not a multiple of 9
    with pytest.raises(ValueError, match="kernel"):
        ops.patches(torch.rand(1, 4, 4, 1), 5, 1)
    topdown, mu, sigma = torch.rand(1, 2, 2, 4), torch.rand(4, 3), torch.ones(4, 3)
    u, eps = torch.rand(1, 2, 2), torch.randn(1, 2, 2, 3)
    kw = dict(top_s=2, divisor=2.0, u=u, eps=eps, sigma_ceiling=4.0)
    with pytest.raises(ValueError, match="mu"):
        ops.sample_components(topdown, mu[:3], sigma[:3], **kw)
    with pytest.raises(ValueError, match="u"):
        ops.sample_components(topdown, mu, sigma, **{**kw, "u": u[0]})
    with pytest.raises(ValueError, match="u"):
        ops.sample_components(topdown, mu, sigma, **{**kw, "u": u + 1})
    with pytest.raises(ValueError, match="eps"):
        ops.sample_components(topdown, mu, sigma, **{**kw, "eps": eps[..., :2]})
    with pytest.raises(ValueError, match="divisor"):
        ops.sample_components(topdown, mu, sigma, **{**kw, "divisor": 0.0})
    with pytest.raises(ValueError, match="sigma"):
        ops.sample_components(topdown, mu, -sigma, **kw)


# ------------------------------------------------------------------------------------------------ backends
def test_auto_picks_a_built_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("DCGMM_BACKEND", raising=False)
    name = ops.resolve_backend("auto", torch.device("cpu"))
    assert name in ops.available_backends() and name in ("cpp", "reference")


def test_cpp_extension_is_built():
    """A broken C++ build must fail the tests, not silently skip every cpp test."""
    if os.environ.get("DCGMM_NO_EXTENSION") == "1":
        pytest.skip("built without the extension on purpose")
    assert "cpp" in ops.available_backends(), backends.problem('cpp')


def test_reference_is_always_available():
    assert "reference" in ops.available_backends()
    assert ops.resolve_backend("reference", torch.device("cpu")) == "reference"


@pytest.mark.parametrize("name", ["cpp", "triton", "cuda"])
def test_unbuilt_backend_says_how_to_build(name):
    if name in ops.available_backends():
        pytest.skip(f"{name} is built here")
    with pytest.raises(ops.BackendNotAvailable, match=name) as info:
        _call(backend=name)
    assert any(word in str(info.value) for word in ("pip install", "build", "use backend"))


def test_env_variable_is_honoured(monkeypatch):
    monkeypatch.setenv("DCGMM_BACKEND", "reference")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("DCGMM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DCGMM_BACKEND"):
        _call()
    # an explicit argument wins over the variable
    assert ops.resolve_backend("reference", torch.device("cpu")) == "reference"
    if "cuda" not in ops.available_backends():
        monkeypatch.setenv("DCGMM_BACKEND", "cuda")
        with pytest.raises(ops.BackendNotAvailable, match="cuda"):
            _call()


def test_import_and_reference_work_without_triton():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, Block())
        import torch, dcgmm_fast
        from dcgmm_fast import ops
        x = torch.rand(1, 5, 5, 1); mu = torch.rand(4, 4); sigma = torch.ones(4, 4)
        out = ops.cgmm(x, mu, sigma, torch.log_softmax(torch.zeros(4), 0), kernel=2, stride=1)
        assert torch.isfinite(out.score).all()
        assert "triton" not in ops.available_backends()
        try:
            ops.cgmm(x, mu, sigma, torch.log_softmax(torch.zeros(4), 0), kernel=2, stride=1, backend="triton")
        except ops.BackendNotAvailable as e:
            assert "pip install triton" in str(e), e
        else:
            raise AssertionError("backend='triton' without triton must raise")
        assert "triton" not in sys.modules
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_value_checks_are_skipped_while_compiling():
    kw = _good()
    compiled = torch.compile(
        lambda x, mu, sigma, log_pi: ops.cgmm(x, mu, sigma, log_pi, kernel=3, stride=1, backend="reference"),
        fullgraph=True,
        dynamic=False,
    )
    out = compiled(kw["x"], kw["mu"], kw["sigma"], kw["log_pi"])
    ref = reference.cgmm(kw["x"], kw["mu"], kw["sigma"], kw["log_pi"], kernel=3, stride=1)
    assert torch.allclose(out.score, ref.score, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.kstar, ref.kstar)


# ------------------------------------------------------------------------------------------------ data gaps
@pytest.mark.parametrize("over,name", [
    (dict(log_pi=torch.full((9,), float("-inf"))), "log_pi"),  # a mixture with no component: NaN before
    (dict(sigma=torch.full((9, 9), 1e30)), "overflow"),
    (dict(x=torch.full((2, 7, 6, 1), 1e30)), "overflow"),
])
def test_data_that_would_give_nan_is_refused(over, name):
    with pytest.raises(ValueError, match=name):
        _call(**over)


def test_sample_components_and_patch_average_refuse_nan():
    g = torch.Generator().manual_seed(0)
    topdown, mu, sigma = torch.rand(2, 3, 2, 4, generator=g), torch.rand(4, 5, generator=g), torch.ones(4, 5)
    u, eps = torch.rand(2, 3, 2, generator=g), torch.randn(2, 3, 2, 5, generator=g)
    kw = dict(top_s=2, divisor=20.0, sigma_ceiling=4.47)
    for name, bad in (("u", dict(u=torch.full_like(u, float("nan")))), ("mu", dict(mu=mu.clone().fill_(float("nan")))),
                      ("eps", dict(eps=eps.clone().fill_(float("nan"))))):
        args = dict(topdown=topdown, mu=mu, sigma=sigma, u=u, eps=eps, **kw)
        args.update(bad)
        with pytest.raises(ValueError, match=name):
            ops.sample_components(args.pop("topdown"), args.pop("mu"), args.pop("sigma"), **args)
    v = torch.rand(2, 5, 4, 9)
    v[0, 1, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="v"):
        ops.patch_average(v, (7, 6), 3, 1)


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in ops.available_backends()])
def test_patch_average_of_no_images_is_empty_in_every_backend(backend):
    out = ops.patch_average(torch.rand(0, 5, 4, 9), (7, 6), 3, 1, backend=backend)
    assert out.shape == (0, 7, 6, 1)
