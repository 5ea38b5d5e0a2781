"""The classifier's SGD step as one C++ op (``dcgmm::classifier_step_cpp``, csrc/cpu/classifier.cpp; what
``train.classifier_step`` runs on CPU) against the ATen step (``classifier_grads`` + ``classifier_apply_``) in
float64, by design.md's tolerance rule."""
import pytest
import torch

from dcgmm_fast import backends, train
from dcgmm_fast.layers import LinearClassifier

SHAPES = [(100, (13, 13, 25), 10), (7, (13, 1, 1), 3), (5, (37, 1, 1), 17), (1, (8, 1, 1), 2), (33, (10, 10, 10), 10),
          (12, (3, 3, 3), 40)]


@pytest.fixture
def op():
    op = backends.cpu_op("classifier_step_cpp")
    if op is None:
        pytest.skip("the C++ extension is not built")
    return op


def _case(n, in_shape, classes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    clf = LinearClassifier(in_shape, classes, reads="x", lr=0.5, dtype=dtype, generator=g)
    with torch.no_grad():
        clf.weight.mul_(20)  # confident logits: a loss far from log(C), gradients far from uniform
        clf.bias.uniform_(-1, 1, generator=g)
    x = torch.rand(n, *in_shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return clf, x, y


def _aten_step(clf, x, y, dtype):
    """The ATen form of the step on a copy of clf in dtype: (weight, bias, loss, accuracy, logits before)."""
    ref = LinearClassifier(clf.in_shape, clf.out_shape[0], reads="x", lr=clf.lr, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(clf.weight), ref.bias.copy_(clf.bias)
        logits = ref(x.to(dtype))
    g_w, g_b, loss, acc = train.classifier_grads(ref, x.to(dtype), y)
    train.classifier_apply_(ref, g_w, g_b)
    return ref.weight.detach(), ref.bias.detach(), loss, acc, logits


def _rel(a, ref):
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("n,in_shape,classes", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_classifier_step_op_matches_float64(op, n, in_shape, classes, dtype, monkeypatch):
    """The parameters' change (lr * gradient), the loss and the accuracy of one step: float64 to 1e-10 relative;
    float32 within 4x the float32 ATen step's own error + 1e-6 (design.md); shapes with a class count that is not a
    multiple of the vector width, several vectors of classes, features that are not a multiple of it, one image."""
    monkeypatch.setenv("DCGMM_POISON", "1")  # the op's outputs start as NaN
    clf, x, y = _case(n, in_shape, classes, dtype, seed=n * 100 + classes)
    w0, b0 = clf.weight.detach().double().clone(), clf.bias.detach().double().clone()
    w64, b64, loss64, acc64, logits64 = _aten_step(clf, x, y, torch.float64)
    w_own, b_own, loss_own, _, _ = _aten_step(clf, x, y, dtype)
    loss, acc = train.classifier_step(clf, x, y)
    assert loss.dtype == dtype and acc.dtype == torch.float32 and loss.shape == acc.shape == ()
    pairs = ((clf.weight.detach() - w0, w_own - w0, w64 - w0), (clf.bias.detach() - b0, b_own - b0, b64 - b0),
             (loss.reshape(1), loss_own.reshape(1), loss64.reshape(1)))
    for got, own, ref in pairs:
        err, own_err = _rel(got, ref), _rel(own, ref)
        assert err <= (1e-10 if dtype == torch.float64 else 4 * own_err + 1e-6), (err, own_err)
    top2 = logits64.topk(min(2, classes), 1).values
    if bool(((top2[:, 0] - top2[:, -1]) > 1e-4 * (1 + top2[:, 0].abs())).all()):  # argmax clear in any precision
        assert float(acc) == float(acc64)


def test_classifier_step_same_bits_for_one_and_two_threads(op):
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            clf, x, y = _case(100, (13, 13, 25), 10, torch.float32, seed=3)
            loss, acc = train.classifier_step(clf, x, y)
            results.append((clf.weight.detach().clone(), clf.bias.detach().clone(), loss, acc))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_classifier_step_op_rejects_bad_input(op):
    clf, x, y = _case(4, (5, 1, 1), 3, torch.float32, seed=0)
    f = x.reshape(4, -1)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="y: label 3 of image 1 is outside"):
            op(clf.weight, clf.bias, f, torch.tensor([0, 3, 1, 2]), 0.1)
        with pytest.raises(RuntimeError, match="features: expected \\(N, 5\\)"):
            op(clf.weight, clf.bias, f[:, :4], y, 0.1)
        with pytest.raises(RuntimeError, match="y: expected \\(4,\\) int64"):
            op(clf.weight, clf.bias, f, y.int(), 0.1)
        with pytest.raises(RuntimeError, match="bias: expected a contiguous \\(3,\\)"):
            op(clf.weight, clf.bias[:2], f, y, 0.1)
