"""dcgmm_fast.layers: initialisation, clipping, annealing buffers in the state dict, pooling, classifier."""
import math

import pytest
import torch
import torch.nn.functional as F

from dcgmm_fast import geometry, ops
from dcgmm_fast.layers import ConvGMM, LinearClassifier, MaxPool


def test_convgmm_original_initialisation():
    g = torch.Generator().manual_seed(0)
    layer = ConvGMM((28, 28, 1), 3, 1, 25, mode="independent", generator=g)
    assert layer.mu.shape == (676, 25, 9) and layer.sigma.shape == (676, 25, 9) and layer.pi_logits.shape == (676, 25)
    mu = layer.mu.detach()
    assert float(mu.abs().max()) <= 0.1 and float(mu.std()) > 0.05  # U(-0.1, 0.1)
    assert torch.all(layer.sigma == math.sqrt(20)) and torch.all(layer.pi_logits == 1 / 25)
    assert float(layer.som_sigma) == pytest.approx(0.25 * math.sqrt(50)) and float(layer.eps) == pytest.approx(0.011)
    assert layer.loss_mult == 676 and layer.window == 100


def test_convgmm_forward_is_the_op():
    layer = ConvGMM((8, 8, 2), 3, 2, 9, som_sigma0=1.3)
    x = torch.rand(2, 8, 8, 2)
    out = layer.cgmm(x)
    ref = ops.cgmm(x, layer.mu, layer.sigma, torch.log_softmax(layer.pi_logits, -1), kernel=3, stride=2,
                   smoothing=ops.smoothing_matrix(9, 1.3))
    assert torch.allclose(out.score, ref.score) and torch.equal(layer(x), out.resp)
    assert out.resp.shape == (2, *layer.out_shape)


def test_global_pi_norm_is_one_softmax_over_positions():
    layer = ConvGMM((6, 6, 1), 3, 3, 4, mode="independent", pi_norm="global")
    with torch.no_grad():
        layer.pi_logits.normal_()
    lp = layer.log_pi().detach()
    assert lp.shape == (4, 4)
    assert float(torch.logsumexp(lp.reshape(-1), 0)) == pytest.approx(0.0, abs=1e-6)
    pos = ConvGMM((6, 6, 1), 3, 3, 4, mode="independent", pi_norm="position")
    pos.load_state_dict(layer.state_dict())
    assert torch.allclose(torch.logsumexp(pos.log_pi(), -1), torch.zeros(4), atol=1e-6)


@pytest.mark.parametrize("mode, pi_norm", [("independent", "global"), ("independent", "position"),
                                           ("shared", "position")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_pi_backward_is_autograds_gradient(mode, pi_norm, dtype, fresh_seed):
    """log_pi_backward (the one-pass step's gradient on pi_logits) equals autograd through log_pi, bit for bit."""
    g = torch.Generator().manual_seed(fresh_seed)
    layer = ConvGMM((6, 6, 1), 3, 1, 9, mode=mode, pi_norm=pi_norm, dtype=dtype, generator=g)
    with torch.no_grad():
        layer.pi_logits.copy_(torch.randn(layer.pi_logits.shape, generator=g, dtype=dtype) * 3)
    log_pi = layer.log_pi()
    d_log_pi = torch.randn(log_pi.shape, generator=g, dtype=dtype)
    want, = torch.autograd.grad(log_pi, layer.pi_logits, d_log_pi)
    got = layer.log_pi_backward(log_pi.detach(), d_log_pi)
    assert got.shape == layer.pi_logits.shape and torch.equal(got, want)


def test_clip_keeps_sigma_in_range():
    layer = ConvGMM((5, 5, 1), 2, 1, 4)
    with torch.no_grad():
        layer.sigma.copy_(torch.linspace(-3, 9, layer.sigma.numel()).reshape(layer.sigma.shape))
    layer.clip_()
    sigma = layer.sigma.detach()
    assert float(sigma.min()) == pytest.approx(layer.sigma_min) and float(sigma.max()) == pytest.approx(math.sqrt(20))


def test_annealing_state_is_saved_and_restored():
    a = ConvGMM((8, 8, 1), 3, 1, 9)
    a.set_annealing(0.0105, 0.5)
    a.anneal_state.copy_(torch.tensor([7.0, -3.5, -4.0, -3.6, 2.0], dtype=torch.float64))
    sd = a.state_dict()
    assert {"eps", "som_sigma", "anneal_state"} <= set(sd) and "smoothing" not in sd
    b = ConvGMM((8, 8, 1), 3, 1, 9)
    assert not b.smoothing_is_identity
    b.load_state_dict(sd)
    assert float(b.som_sigma) == pytest.approx(0.5) and float(b.eps) == pytest.approx(0.0105)
    assert torch.equal(b.anneal_state, a.anneal_state)
    assert torch.allclose(b.smoothing, ops.smoothing_factors(9, 0.5))  # G follows the restored som_sigma
    assert torch.allclose(geometry.smoothing_dense(b.smoothing), ops.smoothing_matrix(9, 0.5), atol=1e-7)
    b.set_annealing(0.01, 0.01)
    assert b.smoothing_is_identity and torch.equal(geometry.smoothing_dense(b.smoothing), torch.eye(9))


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(n_components=8), "n_components"), (dict(mode="dense"), "mode"), (dict(loss="nll"), "loss"),
     (dict(pi_norm="batch"), "pi_norm"), (dict(wait=1.5), "wait"), (dict(kernel=9), "kernel"),
     (dict(window=1), "window"), (dict(gamma=1.0), "gamma"), (dict(eps0=0.001), "eps")],
)
def test_convgmm_rejects_bad_hyper_parameters(kwargs, match):
    args = dict(in_shape=(8, 8, 1), kernel=3, stride=1, n_components=9)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ConvGMM(**args)


@pytest.mark.parametrize("H,k,s,Ho", [(26, 2, 2, 13), (13, 2, 2, 7), (11, 2, 2, 6), (21, 2, 2, 11), (5, 3, 2, 2)])
def test_maxpool_ceil_mode_in_range_only(H, k, s, Ho):
    pool = MaxPool((H, H, 3), k, s)
    assert pool.out_shape == (Ho, Ho, 3)
    x = -torch.rand(2, H, H, 3) - 1  # all negative: an out-of-range zero (or input[0,0,0]) would win
    y = pool(x)
    assert y.shape == (2, Ho, Ho, 3)
    for oy in range(Ho):
        for ox in range(Ho):
            win = x[:, oy * s: oy * s + k, ox * s: ox * s + k, :]
            assert torch.equal(y[:, oy, ox], win.amax(dim=(1, 2)))


@pytest.mark.parametrize("shape,k", [((26, 26, 25), 2), ((10, 6, 3), 2), ((9, 6, 2), 3), ((8, 8, 1), (2, 4))])
def test_maxpool_tiled_windows_equal_max_pool2d(shape, k):
    """Windows that tile the image take the strided-maximum path: the same values as max_pool2d, NaN included."""
    pool = MaxPool(shape, k, k)
    x = torch.randn(3, *shape)
    x[1, 0, 0, 0] = float("nan")
    want = F.max_pool2d(x.permute(0, 3, 1, 2), pool.kernel, pool.stride, ceil_mode=True).permute(0, 2, 3, 1)
    got = pool(x)
    assert got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[1, 0, 0, 0].isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_linear_classifier_init_and_forward():
    g = torch.Generator().manual_seed(0)
    clf = LinearClassifier((13, 13, 25), 10, reads="pool1", generator=g)
    std = 1 / math.sqrt(13 * 13 * 25)
    w = clf.weight.detach()
    assert w.shape == (4225, 10) and float(w.abs().max()) <= 2 * std + 1e-9
    assert float(w.std()) == pytest.approx(0.88 * std, rel=0.05)  # std of a 2-sigma truncated normal
    x = torch.rand(4, 13, 13, 25, generator=g)
    # design.md's tolerance rule against float64 (the two float32 products sum in different orders: allclose's
    # 1e-5 relative failed now and then on logits near zero)
    ref = F.linear(x.double().reshape(4, -1), clf.weight.double().T, clf.bias.double())
    with torch.no_grad():
        err = (clf(x).double() - ref).abs().max() / ref.abs().max()
        own = (F.linear(x.reshape(4, -1), clf.weight.T, clf.bias).double() - ref).abs().max() / ref.abs().max()
    assert float(err) <= 4 * float(own) + 1e-6
