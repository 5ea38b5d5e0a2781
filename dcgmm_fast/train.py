"""Training of a DCGMM stack, layer by layer (spec 1.7, 1.8, 2.4). Works on layers; never imports the model.

One training step, for each mini-batch, bottom-up: every ConvGMM maximises the mean of its own ``score`` over
batch and positions, on its input detached from the layers below (no gradient ever crosses layers); it passes
up the responsibilities computed with its pre-update parameters. MaxPool just forwards. The classifier learns
from step 0 on the detached output of the layer it reads. A layer whose ``wait`` fraction of training has not
passed only forwards (the original sets its lambdas to 0 and does not feed its controller).

Update rules:
- original (default): gradient ascent ``theta += lambda_theta * eps * loss_mult * dJ/dtheta`` for mu, sigma and
  pi_logits, then sigma clipped to [sigma_min, sqrt(sigma_upper_bound)]; loss_mult = P in independent mode.
- any torch optimizer: minimises ``-loss_mult * J`` with per-group learning rates
  ``lr * lambda_theta * eps / eps0`` (so SingleExp's eps annealing scales them), the same clipping.
``SingleExp`` anneals eps and som_sigma per layer from the stream of its mean scores, outside the step.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, ops
from .anneal import SingleExp, anneal_  # noqa: F401  (SingleExp: the host reference)
from .distributed import World
from .geometry import out_hw
from .guard import StepGuard
from .layers import ConvGMM, LinearClassifier, MaxPool
from .schedule import Schedule
from .types import CGMMOut
from .validation import check_images

OptimizerFactory = Callable[[List[dict]], torch.optim.Optimizer]


# -------------------------------------------------------------------------------------------------- steps
#: entries of the fixed-order sums' blocks
_SUM_BLOCK = 256
#: elements per reduction op: below torch's parallel grain (32768), so no op is split over threads (and no OpenMP
#: region is started for it: a region costs ~0.1 ms when idle workers sleep)
_SUM_OP_ELEMENTS = 30720


def _row_sums(rows: torch.Tensor) -> torch.Tensor:
    """(R, L) -> (R,) float64, each row by one op under the parallel grain (rows split into several ops)."""
    per_op = max(1, _SUM_OP_ELEMENTS // max(1, rows.shape[1]))
    sums = [r.sum(1, dtype=torch.float64) for r in rows.split(per_op)]
    return torch.cat(sums) if len(sums) > 1 else sums[0]


def fixed_order_row_sums(rows: torch.Tensor) -> torch.Tensor:
    """(R, L) -> (R,) float64 sums, each row in fixed blocks of 256 (a last partial block alone), level by level:
    the same bits for any thread count, and a row's sum does not depend on the other rows (nor on where they lie).
    On CPU one C++ op (``dcgmm::fixed_order_sums_cpp``, csrc/cpu/row_sums.cpp) where the extension is built, else
    (and on GPUs) ``aten_fixed_order_row_sums``: each is deterministic; they agree to float64 rounding."""
    rows = rows.detach()
    op = backends.cpu_op("fixed_order_sums_cpp") if rows.device.type == "cpu" else None
    return op(rows) if op is not None else aten_fixed_order_row_sums(rows)


def aten_fixed_order_row_sums(rows: torch.Tensor) -> torch.Tensor:
    """``fixed_order_row_sums`` by ATen reductions (each block by ATen's float64 sum kernel, one op under the
    parallel grain per group of blocks)."""
    rows = rows.detach()
    R = rows.shape[0]
    while rows.shape[1] > _SUM_BLOCK:
        L = rows.shape[1]
        nb = L // _SUM_BLOCK
        sums = _row_sums(rows[:, :nb * _SUM_BLOCK].reshape(R * nb, _SUM_BLOCK)).view(R, nb)
        if nb * _SUM_BLOCK < L:
            sums = torch.cat([sums, _row_sums(rows[:, nb * _SUM_BLOCK:])[:, None]], 1)
        rows = sums
    return _row_sums(rows)


def image_score_sums(score: torch.Tensor) -> torch.Tensor:
    """score (N, ...) -> (N,) float64: each image's sum over its positions, in fixed order (``fixed_order_row_sums``).
    The data-parallel step gathers these in image order (``distributed.World.combine``)."""
    return fixed_order_row_sums(score.reshape(score.shape[0], -1))


def mean_of_image_sums(sums: torch.Tensor, numel: int) -> torch.Tensor:
    """(N,) float64 per-image sums of ``numel`` entries in all -> their mean () float64, summed in fixed order."""
    return fixed_order_row_sums(sums.view(1, -1))[0] / numel


def fixed_order_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of all entries of t (N, ...): per-image sums, then their sum in image order, all in float64 in fixed
    blocks: the same bits for any thread count, and for any split of the batch over processes whose sums are
    gathered in image order. ``Tensor.mean`` of 67,600 scores differs by ~5e-7 between 1 and 2 threads, and the
    annealing controller takes threshold decisions on it. Returns a () tensor of t's dtype; not differentiable
    (the step's gradient comes from ``mean_grad``)."""
    t = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
    return mean_of_image_sums(image_score_sums(t), t.numel()).to(t.dtype)


def _one_over(numel: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """1 / numel, a () tensor of dtype: each entry's weight in a mean of numel entries."""
    return torch.full((), 1.0, dtype=dtype, device=device).div(numel)


@functools.lru_cache(maxsize=64)
def _one_over_host(numel: int, dtype: torch.dtype) -> float:
    """``_one_over`` as a host float (the one pass's g_score), computed once per (numel, dtype): no tensor ops."""
    return _one_over(numel, dtype).item()


def mean_grad(t: torch.Tensor) -> torch.Tensor:
    """The gradient of ``t.mean()`` with respect to t: 1 / numel, one value expanded to t's shape (no memory, no
    op: the C++ backward reads it as a single value, and no mean is computed that nobody reads)."""
    return _one_over(t.numel(), t.dtype, t.device).expand(t.shape)


def gmm_step(layer: ConvGMM, x: torch.Tensor):
    """One step of the original update rule on x (N, H, W, C); returns (resp (N,H',W',K), mean score ()).

    No Python branching on tensor values: ``torch.compile(fullgraph=True)`` compiles it (see ``compile_step``).
    """
    resp, score, _ = _gmm_step(layer, x)
    return resp, score


def _gmm_grads(layer: ConvGMM, x: torch.Tensor):
    """(the op's output on x, (d mean score / d mu, sigma, pi_logits)) before any update."""
    if _one_pass_grads(layer):
        return _gmm_grads_one_pass(layer, x)
    out = layer.cgmm(x, check=False)
    grads = torch.autograd.grad(out.score, (layer.mu, layer.sigma, layer.pi_logits),
                                grad_outputs=mean_grad(out.score))
    return out, grads


def _one_pass_grads(layer: ConvGMM) -> bool:
    """cpp layers in eager mode take their forward and gradients from one C++ pass (``cgmm_fwd_grads_cpp``: the
    same bits as the op's forward and autograd backward, without a second read of the input); compiled steps keep
    the op and its autograd."""
    p = layer.mu
    if p.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return backends.resolve(layer.backend, p.device) == "cpp" and hasattr(torch.ops.dcgmm, "cgmm_fwd_grads_cpp")


def _one_pass(layer: ConvGMM, x: torch.Tensor, steps: Tuple = (None, None)):
    """``dcgmm::cgmm_fwd_grads_cpp`` on the layer for its mean score: (the op's outputs: resp, score, lse, kstar,
    d_mu, d_sigma, the gradient on pi_logits (through log_softmax: ``ConvGMM.log_pi_backward``), max |mu|).
    steps: (s_mu, s_sigma) to apply the update rule to mu and sigma in the pass (max |mu| is then after it; d_mu
    and d_sigma, which only the update reads, then stay in the pass and come back empty)."""
    numel = x.shape[0] * math.prod(out_hw(x.shape[1:3], layer.kernel, layer.stride))
    with torch.no_grad():
        log_pi = layer.log_pi()
        *outs, d_log_pi, mu_max = torch.ops.dcgmm.cgmm_fwd_grads_cpp(
            x, layer.mu, layer.sigma, log_pi, list(layer.kernel), list(layer.stride), layer.loss,
            layer.op_smoothing(), _one_over_host(numel, x.dtype), *steps, layer.sigma_min, layer.sigma_max,
            steps[0] is None)
        return (*outs, layer.log_pi_backward(log_pi, d_log_pi), mu_max)


def _gmm_grads_one_pass(layer: ConvGMM, x: torch.Tensor):
    """``_gmm_grads`` by the one pass (the same bits as the op and its autograd backward)."""
    *out, d_mu, d_sigma, g_pi, _ = _one_pass(layer, x)
    return CGMMOut(*out), (d_mu, d_sigma, g_pi)


def _gmm_step_one_pass(layer: ConvGMM, x: torch.Tensor):
    """``_gmm_step`` of a cpp layer in eager mode: the one pass also applies the update rule to mu and sigma where
    it writes their gradients (gmm_update_cpp's arithmetic, in cache), pi_logits by ``gmm_update_cpp`` (with empty
    mu and sigma) after its gradient comes back through log_softmax. The same bits as ``_gmm_grads`` then
    ``update_``. Returns (resp, mean score (), (max |mu|, max |pi_logits|) (2,) after the update)."""
    s_mu, s_sigma, s_pi = _step_sizes(layer)
    resp, score, _, _, _, _, g_pi, mu_max = _one_pass(layer, x, (s_mu, s_sigma))
    with torch.no_grad():
        none = layer.mu.new_empty(0)
        pi_max = torch.ops.dcgmm.gmm_update_cpp(none, none.clone(), layer.pi_logits, none.clone(), none.clone(), g_pi,
                                                s_mu, s_sigma, s_pi, layer.sigma_min, layer.sigma_max)[1]
    return resp, fixed_order_mean(score), torch.stack([mu_max, pi_max])


def _gmm_step(layer: ConvGMM, x: torch.Tensor, fused: Optional[str] = None):
    """gmm_step, plus (max |mu|, max |pi_logits|) (2,) after the update when the fused update took them (else
    None: the step guard takes them itself). ``fused``: the backend whose fused step ops run it (``fused_step``)."""
    if fused is not None:
        with torch.no_grad():
            log_pi = layer.log_pi()
        out, stats = step_partials(layer, x, fused, log_pi)
        maxima = step_finalize_(layer, stats, 1.0 / out.score.numel(), fused, log_pi)
        return out.resp, fixed_order_mean(out.score), maxima
    if _one_pass_grads(layer) and _fused_update(layer):
        return _gmm_step_one_pass(layer, x)
    out, grads = _gmm_grads(layer, x)
    maxima = update_(layer, *grads)
    return out.resp.detach(), fixed_order_mean(out.score), maxima


# ------------------------------------------------------------------------------- the fused step (issue 23)
def fused_step(layer: ConvGMM, device: torch.device, mode: Optional[bool]) -> Optional[str]:
    """The backend whose two fused step ops (``ops.cgmm_step_partials`` / ``cgmm_step_finalize``) train this layer,
    or None for the autograd step. ``mode``: None = where the layer's calls resolve to the cuda backend (its fused
    step replaces the ~60 launches of the autograd step, eager mode only); True = always, with the layer's resolved
    backend when it has the step (cuda, cpp, reference), else the reference; False = never."""
    if mode is False or torch.compiler.is_compiling():
        return None
    K = layer.n_components
    key = (backends.layer_key(layer.in_shape, layer.kernel, layer.stride, K, layer.mode == "independent")
           if device.type == "cuda" else None)
    name = backends.resolve_layer(layer.backend, device, key)
    if mode is None:
        return name if name == "cuda" and K <= 128 else None
    return name if backends.has_step(name) else "reference"


def step_partials(layer: ConvGMM, x: torch.Tensor, backend: str, log_pi: torch.Tensor):
    """(the layer's op output on x, its step statistics (G, K, 1 + 2D) float64) from the fused partials op;
    log_pi: ``layer.log_pi()`` (computed once for both halves of the step)."""
    with torch.no_grad():
        return ops._step_partials_unchecked(x, layer.mu, layer.sigma, log_pi, kernel=layer.kernel,
                                            stride=layer.stride, loss=layer.loss, smoothing=layer.op_smoothing(),
                                            backend=backend)


def _step_multipliers(layer: ConvGMM) -> torch.Tensor:
    """(3,) loss_mult * (lambda_mu, lambda_sigma, lambda_pi) on the parameters' device, made once per layer (the
    step sizes are eps times these: one op per step, no host-to-device copy)."""
    p = layer.mu
    key = (p.device, p.dtype, layer.loss_mult, layer.lambda_mu, layer.lambda_sigma, layer.lambda_pi)
    cached = getattr(layer, "_step_multipliers", None)
    if cached is None or cached[0] != key:
        lam = torch.tensor([layer.lambda_mu, layer.lambda_sigma, layer.lambda_pi], dtype=torch.float64)
        cached = (key, (lam * layer.loss_mult).to(device=p.device, dtype=p.dtype))
        layer._step_multipliers = cached
    return cached[1]


def step_finalize_(layer: ConvGMM, stats: torch.Tensor, scale: float, backend: str,
                   log_pi: torch.Tensor) -> torch.Tensor:
    """The original update rule from step statistics (``scale`` = 1 / rows) by the fused finalize op, written into
    the layer's parameters; returns (max |mu|, max |pi_logits|) (2,) for the step guard. log_pi: the layer's
    normalised log weights before the update (those of the forward)."""
    with torch.no_grad():
        steps = layer.eps.to(layer.mu.dtype) * _step_multipliers(layer)
        mu, sigma, pi, maxima = ops.cgmm_step_finalize(
            stats, layer.mu, layer.sigma, layer.pi_logits, log_pi, smoothing=layer.op_smoothing(),
            scale=scale, steps=steps, sigma_min=layer.sigma_min, sigma_max=layer.sigma_max,
            pi_global=layer.mode == "independent" and layer.pi_norm == "global", backend=backend)
        layer.mu.copy_(mu)
        layer.sigma.copy_(sigma)
        layer.pi_logits.copy_(pi)
    return maxima


def _forward_score(layer: ConvGMM, x: torch.Tensor):
    """A waiting layer: (resp, mean score ()) of the forward alone."""
    with torch.no_grad():
        out = layer.cgmm(x, check=False)
    return out.resp, fixed_order_mean(out.score)


def _fused_update(layer: ConvGMM) -> bool:
    """The one-pass C++ update serves cpp layers in eager mode (compiled steps keep the ATen ops, which give the
    same bits: both are single-rounding multiply-adds)."""
    p = layer.mu
    if p.device.type != "cpu" or torch.compiler.is_compiling() or not hasattr(torch.ops.dcgmm, "gmm_update_cpp"):
        return False
    return (backends.resolve(layer.backend, p.device) == "cpp" and p.is_contiguous()
            and layer.sigma.is_contiguous() and layer.pi_logits.is_contiguous())


def _step_sizes(layer: ConvGMM) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_mu, s_sigma, s_pi) () tensors of the update rule: eps * loss_mult * lambda_theta, in the parameters' dtype
    (eps is a float32 buffer)."""
    scale = layer.eps.to(layer.mu.dtype) * layer.loss_mult
    return scale * layer.lambda_mu, scale * layer.lambda_sigma, scale * layer.lambda_pi


def update_(layer: ConvGMM, g_mu: torch.Tensor, g_sigma: torch.Tensor, g_pi: torch.Tensor) -> Optional[torch.Tensor]:
    """The original update rule in place: theta += lambda_theta * eps * loss_mult * g_theta, sigma clipped. Returns
    (max |mu|, max |pi_logits|) (2,) after it from the fused C++ pass (``csrc/cpu/update.cpp``: one parallel
    region instead of six), or None from the ATen ops (addcmul with () step tensors: no temporary, no host read)."""
    s_mu, s_sigma, s_pi = _step_sizes(layer)
    with torch.no_grad():
        if _fused_update(layer):
            return torch.ops.dcgmm.gmm_update_cpp(layer.mu, layer.sigma, layer.pi_logits, g_mu, g_sigma, g_pi,
                                                  s_mu, s_sigma, s_pi, layer.sigma_min, layer.sigma_max)
        layer.mu.addcmul_(g_mu, s_mu)
        layer.sigma.addcmul_(g_sigma, s_sigma).clamp_(layer.sigma_min, layer.sigma_max)
        layer.pi_logits.addcmul_(g_pi, s_pi)
    return None


def gmm_step_optimizer(layer: ConvGMM, x: torch.Tensor, optimizer: torch.optim.Optimizer):
    """One step of a torch optimizer minimising -loss_mult * mean score; returns (resp, mean score)."""
    out = layer.cgmm(x, check=False)
    optimizer.zero_grad(set_to_none=True)
    (-layer.loss_mult * out.score.mean()).backward()
    optimizer.step()
    layer.clip_()
    return out.resp.detach(), fixed_order_mean(out.score)


def classifier_grads(clf: LinearClassifier, features: torch.Tensor, y: torch.Tensor):
    """(d weight^T (10, F), d bias (10,), loss (), accuracy ()) of softmax cross-entropy on a batch.

    The gradients are written out (what autograd computes): d logits = (softmax - onehot) / N, d weight =
    features^T d logits, formed as (d logits^T features)^T, which BLAS runs 4-8x faster for a weight (F, 10).
    """
    with torch.no_grad():
        f = features.reshape(features.shape[0], -1)
        logits = clf(features)
        logp = F.log_softmax(logits, dim=1)
        loss = F.nll_loss(logp, y)
        acc = (logits.argmax(1) == y).float().mean()
        g = logp.exp()
        g[torch.arange(g.shape[0], device=g.device), y] -= 1.0
        g /= g.shape[0]
        return g.t() @ f, g.sum(0), loss, acc


def classifier_apply_(clf: LinearClassifier, g_weight_t: torch.Tensor, g_bias: torch.Tensor) -> None:
    """SGD with the classifier's lr (a host float: no device read)."""
    with torch.no_grad():
        clf.weight.t().sub_(g_weight_t, alpha=clf.lr)
        clf.bias.sub_(g_bias, alpha=clf.lr)


def classifier_step(clf: LinearClassifier, features: torch.Tensor, y: torch.Tensor):
    """One SGD step on softmax cross-entropy; returns (loss (), accuracy () float32). On CPU one C++ op
    (``dcgmm::classifier_step_cpp``, csrc/cpu/classifier.cpp) where the extension is built, else the ATen ops of
    ``classifier_grads`` and ``classifier_apply_`` (the data-parallel step's, which all-reduces between them)."""
    w, b = clf.weight, clf.bias
    op = backends.cpu_op("classifier_step_cpp") if w.device.type == "cpu" else None
    if op is not None and w.is_contiguous() and b.is_contiguous() and features.dtype == w.dtype:
        with torch.no_grad():
            loss, acc = op(w, b, features.reshape(features.shape[0], -1), y, clf.lr)
        return loss, acc
    g_weight, g_bias, loss, acc = classifier_grads(clf, features, y)
    classifier_apply_(clf, g_weight, g_bias)
    return loss, acc


def _dynamo_config():
    """Settings the compiled step needs: autograd.grad inside the graph, one cache entry per layer and G state."""
    cfg = torch._dynamo.config
    patch = {}
    if hasattr(cfg, "trace_autograd_ops"):
        patch["trace_autograd_ops"] = True
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            patch[name] = max(getattr(cfg, name), 64)
            break
    return cfg.patch(**patch)


def compile_step(step: Callable, backend: str = "inductor") -> Callable:
    """``torch.compile(step, fullgraph=True, dynamic=False, backend=backend)`` run under the dynamo settings it
    needs. fullgraph: a host read or any other graph break inside the step is an error, not a silent slow path."""
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)

    def run(*args):
        with _dynamo_config():
            return compiled(*args)

    return run


# -------------------------------------------------------------------------------------------------- trainer
class History:
    """Per-step records of a ``fit``: mean score and som_sigma per GMM layer, classifier loss and accuracy.

    A step appends its values as one small device tensor (no host read); the lists are filled from them with
    one transfer when any of them is read (``score``, ``som_sigma``, ``classifier_loss``,
    ``classifier_accuracy``) or at ``flush()``: ``fit`` reads them only at its check interval.
    """

    def __init__(self):
        self.steps = 0
        self._score: Dict[str, List[float]] = {}
        self._som_sigma: Dict[str, List[float]] = {}
        self._loss: List[float] = []
        self._accuracy: List[float] = []
        self._pending: List[torch.Tensor] = []
        self._layout: Optional[tuple] = None  # (GMM names, has classifier) of the pending rows

    def record(self, gmm_names: Sequence[str], values: torch.Tensor, classifier: bool) -> None:
        """values (2 * len(gmm_names) [+ 2],) float64: (score, som_sigma) per GMM layer [, loss, accuracy]."""
        layout = (tuple(gmm_names), classifier)
        if self._layout is not None and layout != self._layout:
            self.flush()
        self._layout = layout
        self._pending.append(values)

    def flush(self) -> None:
        """Move the pending device records into the lists (one host transfer)."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).cpu().tolist()
        names, classifier = self._layout
        self._pending = []
        for row in rows:
            for j, name in enumerate(names):
                self._score.setdefault(name, []).append(row[2 * j])
                self._som_sigma.setdefault(name, []).append(row[2 * j + 1])
            if classifier:
                self._loss.append(row[-2])
                self._accuracy.append(row[-1])

    @property
    def score(self) -> Dict[str, List[float]]:
        self.flush()
        return self._score

    @property
    def som_sigma(self) -> Dict[str, List[float]]:
        self.flush()
        return self._som_sigma

    @property
    def classifier_loss(self) -> List[float]:
        self.flush()
        return self._loss

    @property
    def classifier_accuracy(self) -> List[float]:
        self.flush()
        return self._accuracy


def optimizer_param_groups(layers: Sequence[nn.Module]) -> List[dict]:
    """Param groups for a torch optimizer: one per ConvGMM parameter, carrying its lambda as ``lr_mult``."""
    groups = []
    for layer in layers:
        if isinstance(layer, ConvGMM):
            for p, lam in ((layer.mu, layer.lambda_mu), (layer.sigma, layer.lambda_sigma),
                           (layer.pi_logits, layer.lambda_pi)):
                groups.append({"params": [p], "lr_mult": lam, "layer": layer})
    return groups




class Trainer:
    """Trains a stack of layers (ConvGMM / MaxPool / LinearClassifier), bottom-up, one step per mini-batch.

    Args:
        layers: the stack, bottom-up; at most one LinearClassifier, last.
        names: a name per layer; the classifier's ``reads`` names one of them.
        optimizer: None for the original update rule; "sgd" / "adam" (lr 0.01 / 0.001); or a factory called with
            ``optimizer_param_groups(layers)`` (each group has an ``lr_mult`` key) returning a torch optimizer.
        lr: base learning rate for the "sgd" / "adam" shortcuts.
        compile: capture the whole multi-layer step (every layer's forward, backward, update, annealing, guard and
            history row) with ``torch.compile(fullgraph=True, dynamic=False)``: True for the default (inductor), or
            a torch.compile backend name (e.g. "aot_eager": traced, then run by the eager kernels). Original
            update rule only. One graph per set of training layers (a layer's ``wait`` ending recompiles once).
        fused_step: the layer step by the two fused step ops (``ops.cgmm_step_partials`` / ``cgmm_step_finalize``)
            instead of autograd: None (default) where a layer runs on the cuda backend; True for every layer (the
            layer's backend when it has them, else the reference); False never. Original update rule, eager.
        world: a ``distributed.World`` to train data-parallel in (None: ``World.current()``, the initialised
            default process group when it has more than one rank): each rank takes its share of every global
            batch, one all-reduce per step combines every layer's gradients and gathers its per-image scores,
            and every rank takes the same step (the original update rule, eager).

    ``guard`` (a ``StepGuard``) records divergence on the device at every step; ``fit`` reads it every
    ``check_every`` steps and at its end and raises ``DivergenceError`` naming the layer, step and quantity.
    On a GPU, or compiled, a step reads nothing back to the host: the annealing controller (``anneal.anneal_``),
    its counters, the smoothing factors and the history stay on the device. On CPU in eager mode the annealing
    runs on the host (``SingleExp``, the same decisions bit for bit; a CPU read costs no sync) and a smoothing that
    became the identity is skipped (the same result, cheaper).
    """

    def __init__(self, layers: Sequence[nn.Module], names: Sequence[str], *,
                 optimizer: Union[None, str, OptimizerFactory] = None, lr: Optional[float] = None,
                 compile: Union[bool, str] = False, world: Optional[World] = None,
                 fused_step: Optional[bool] = None):
        self.layers, self.names = list(layers), list(names)
        self.fused_step = fused_step
        self.world = world if world is not None else World.current()
        if len(self.layers) != len(self.names):
            raise ValueError("names: expected one name per layer")
        self.classifier_input = None
        for i, layer in enumerate(self.layers):
            if isinstance(layer, LinearClassifier):
                if i != len(self.layers) - 1:
                    raise ValueError("layers: the classifier must be the last layer")
                if layer.reads not in self.names[:i]:
                    raise ValueError(f"reads: classifier reads {layer.reads!r}, not one of {self.names[:i]}")
                self.classifier_input = self.names.index(layer.reads)
            elif not isinstance(layer, (ConvGMM, MaxPool)):
                raise TypeError(f"layers: unsupported layer {type(layer).__name__}")
        self.gmms = [i for i, layer in enumerate(self.layers) if isinstance(layer, ConvGMM)]
        self.gmm_names = [self.names[i] for i in self.gmms]
        self.optimizer = self._make_optimizer(optimizer, lr)
        if compile and self.optimizer is not None:
            raise ValueError("compile: only the original update rule is compiled; use optimizer=None")
        if self.world is not None and (compile or self.optimizer is not None):
            raise ValueError("world: data-parallel training runs the original update rule, eager (optimizer=None, "
                             "compile=False)")
        if compile not in (False, True) and not isinstance(compile, str):
            raise ValueError(f"compile: expected a bool or a torch.compile backend name, got {compile!r}")
        params = [p for layer in self.layers for p in layer.parameters()]
        device = params[0].device if params else torch.device("cpu")
        self.dtype = params[0].dtype if params else torch.float32
        self.guard = StepGuard(self.names, device, classifier=self.classifier_input is not None)
        if compile:
            backend = "inductor" if compile is True else compile
            self._run = compile_step(self._step_all, backend)
        else:
            self._run = self._step_all
        # CPU eager: the host controller (``SingleExp``, bit-identical to ``anneal_``): reading a CPU tensor costs
        # no sync, and it refreshes the smoothing (and whether it is the identity) only when som_sigma changes
        self._host_control = device.type == "cpu" and not compile
        self.controllers = {i: SingleExp.for_layer(self.layers[i]) for i in self.gmms} if self._host_control else {}

    def _make_optimizer(self, optimizer, lr):
        if optimizer is None:
            return None
        groups = optimizer_param_groups(self.layers)
        plain = [{k: v for k, v in g.items() if k != "layer"} for g in groups]  # optimizers take no modules
        if optimizer == "sgd":
            base = 0.01 if lr is None else lr
            opt = torch.optim.SGD(plain, lr=base)
        elif optimizer == "adam":
            base = 1e-3 if lr is None else lr
            opt = torch.optim.Adam(plain, lr=base)
        elif callable(optimizer):
            opt = optimizer(plain)
        else:
            raise ValueError(f"optimizer: expected None, 'sgd', 'adam' or a factory, got {optimizer!r}")
        for group, spec in zip(opt.param_groups, groups):
            group["base_lr"], group["layer"] = group["lr"], spec["layer"]
        return opt

    def _fused(self, layer: ConvGMM, x: torch.Tensor) -> Optional[str]:
        """The backend of the layer's fused step, or None (see ``fused_step``); never for an optimizer."""
        if self.optimizer is not None:
            return None
        return fused_step(layer, x.device, self.fused_step)

    def _anneal_host(self, i: int, score: float) -> None:
        layer, ctrl = self.layers[i], self.controllers[i]
        ctrl.step(score)
        layer.anneal_state.copy_(torch.tensor(ctrl.counters(), dtype=torch.float64))
        layer.set_annealing(ctrl.eps, ctrl.som_sigma)

    def _guard_and_anneal(self, i: int, score: torch.Tensor, maxima: Optional[torch.Tensor]) -> None:
        """After layer i's update: the step guard's record and the annealing controller fed with its mean score."""
        layer = self.layers[i]
        if self._host_control:  # CPU eager: the same record and decisions from host values, no tiny tensor ops
            s = float(score)
            self.guard.record_gmm_host(i, s, layer.mu, layer.pi_logits, maxima)
            self._anneal_host(i, s)
        else:
            self.guard.record_gmm(i, score, layer.mu, layer.pi_logits, maxima)
            anneal_(layer, score)

    def _set_learning_rates(self) -> None:
        """Optimizer path: lr = base_lr * lambda * eps / eps0 for each group (annealing and lambdas)."""
        for group in self.optimizer.param_groups:
            layer = group["layer"]
            group["lr"] = group["base_lr"] * group["lr_mult"] * float(layer.eps) / layer.eps0

    def train_step(self, x: torch.Tensor, y: Optional[torch.Tensor], progress: float, history: History) -> None:
        """One mini-batch through every layer; ``progress`` = fraction of training done (for waits).

        x: (N, H, W, C) float in [0, 1], or uint8 (scaled by 1/255 inside the step). The step's records go to
        ``history`` as one device tensor; on a GPU or compiled the annealing runs on the device too
        (``anneal.anneal_``), so the step reads nothing back to the host.
        """
        active = tuple(isinstance(layer, ConvGMM) and progress >= layer.wait for layer in self.layers)
        values = self._run(x, y, active)
        history.record(self.gmm_names, values, y is not None and self.classifier_input is not None)

    def _step_all(self, x: torch.Tensor, y: Optional[torch.Tensor], active: Tuple[bool, ...]) -> torch.Tensor:
        """The whole step as tensor ops (what ``compile`` captures); returns the history row (see History)."""
        if x.dtype == torch.uint8:
            x = (x.to(torch.float32) / 255.0).to(self.dtype)  # exactly data.to_images' values
        if self.world is not None:
            return self._step_all_ranks(x, y, active)
        outputs, values = [], []
        h = x
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ConvGMM):
                if not active[i]:  # waiting: forward only, controller not fed
                    h, score = _forward_score(layer, h)
                else:
                    maxima = None
                    if self.optimizer is None:
                        h, score, maxima = _gmm_step(layer, h, self._fused(layer, h))
                    else:
                        self._set_learning_rates()
                        # every other layer's grads are None after zero_grad, so the step moves only this one
                        h, score = gmm_step_optimizer(layer, h, self.optimizer)
                    self._guard_and_anneal(i, score, maxima)
                values += [score.double(), layer.som_sigma.double()]
            elif isinstance(layer, MaxPool):
                with torch.no_grad():
                    h = layer(h)
            elif y is not None:  # classifier
                loss, acc = classifier_step(layer, outputs[self.classifier_input].detach(), y)
                if self._host_control:
                    self.guard.record_classifier_host(i, float(loss))
                else:
                    self.guard.record_classifier(i, loss)
                values += [loss.double(), acc.double()]
            outputs.append(h)
        self.guard.advance()
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=x.device)

    def _step_all_ranks(self, x: torch.Tensor, y: Optional[torch.Tensor], active: Tuple[bool, ...]) -> torch.Tensor:
        """The data-parallel step with one all-reduce: every layer's forward and backward on this rank's share
        (each layer's input is the pre-update output of the one below, so no layer waits for another's update),
        then one ``World.combine`` of every layer's gradients and per-image score sums and the classifier's
        gradients and metrics, then the updates, guard and annealing in layer order (the same as ``_step_all``
        with a world: every rank takes the same step)."""
        outputs, work = [], []  # work: (layer index, kind, grads, score tensor or None)
        h = x
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ConvGMM):
                if not active[i]:
                    with torch.no_grad():
                        out = layer.cgmm(h, check=False)
                    work.append((i, "wait", [], out.score))
                elif (name := self._fused(layer, h)) is not None:  # the ranks add up the step statistics
                    with torch.no_grad():
                        log_pi = layer.log_pi()
                    out, stats = step_partials(layer, h, name, log_pi)
                    work.append((i, ("step", name, log_pi), [stats], out.score))
                else:
                    out, grads = _gmm_grads(layer, h)
                    work.append((i, "gmm", list(grads), out.score.detach()))
                h = out.resp.detach()
            elif isinstance(layer, MaxPool):
                with torch.no_grad():
                    h = layer(h)
            elif y is not None:  # classifier
                g_weight, g_bias, loss, acc = classifier_grads(layer, outputs[self.classifier_input].detach(), y)
                work.append((i, "clf", [g_weight, g_bias, torch.stack([loss, acc])], None))
            outputs.append(h)
        grads = [g for _, _, gs, _ in work for g in gs]
        sums = [image_score_sums(score) for _, _, _, score in work if score is not None]
        grads, gathered = self.world.combine(grads, sums)
        values, gi, si = [], 0, 0
        for i, kind, gs, score in work:
            mine = grads[gi:gi + len(gs)]
            gi += len(gs)
            layer = self.layers[i]
            if kind == "clf":
                classifier_apply_(layer, mine[0], mine[1])
                loss, acc = mine[2].unbind()
                self.guard.record_classifier(i, loss)
                values += [loss.double(), acc.double()]
                continue
            mean = mean_of_image_sums(gathered[si], score.numel() * self.world.size).to(score.dtype)
            si += 1
            if kind == "gmm":
                self._guard_and_anneal(i, mean, update_(layer, *mine))
            elif isinstance(kind, tuple):  # ("step", backend, log_pi): mean statistics over ranks, 1 / own rows
                self._guard_and_anneal(i, mean, step_finalize_(layer, mine[0], 1.0 / score.numel(), kind[1],
                                                               kind[2]))
            values += [mean.double(), layer.som_sigma.double()]
        self.guard.advance()
        return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64, device=x.device)

    def fit(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, epochs: float, batch_size: int = 100,
            seed: Optional[int] = None, reshuffle: bool = False, start_step: int = 0,
            stop_step: Optional[int] = None, callback: Optional[Callable[[int, int, History], None]] = None,
            check_every: int = 50, should_stop: Optional[Callable[[], bool]] = None,
            check_data: bool = True) -> History:
        """Train on x (N, H, W, C) float in [0, 1] or uint8 (and labels y (N,) for the classifier), on x's device:
        a data set that fits stays there (uint8 is scaled inside each step), batches are indexed in place.

        As the original: the training order is shuffled once (seeded) and the same order of full batches
        (remainder dropped) repeats every epoch (``reshuffle``: a new seeded order every epoch); steps =
        (N // batch_size) * epochs (``schedule.Schedule``). With a world (see the class), ``batch_size`` is the
        global batch: each rank takes its equal share of it, in rank order.

        Args:
            start_step: steps already done (resume): training continues at that step of the same schedule.
            stop_step: stop before this step (a time-boxed part of the schedule); None: the end.
            callback: called after every step with (step, total_steps, history).
            check_every: read the step guard every this many steps (and always at the end).
            should_stop: asked after every step; True ends ``fit`` there (e.g. on SIGINT), the step completed.
            check_data: scan x once for NaN/Inf and [0, 1] (False: the caller did, e.g. ``DCGMM.fit``).
        Returns:
            History of this call's steps.
        Raises:
            DivergenceError: a layer diverged (see ``guard.StepGuard``); parameters are those after the step
                that was being checked, so no checkpoint should be written from them.
        """
        n = x.shape[0]
        if y is not None and y.shape[0] != n:
            raise ValueError(f"y: expected {n} labels, got {y.shape[0]}")
        if check_data and x.dtype != torch.uint8:
            check_images("x", x)  # once, here: the steps run the ops without data scans
        schedule = Schedule(n, batch_size, seed if seed is not None else int(torch.initial_seed()) % 2**63,
                            reshuffle=reshuffle, rank=0 if self.world is None else self.world.rank,
                            world_size=1 if self.world is None else self.world.size)
        total = int(round(schedule.steps_per_epoch * epochs))
        orders = {}  # per epoch (one unless reshuffled), moved to x's device once: a step indexes the data there

        def batch(step):
            e = step // schedule.steps_per_epoch if reshuffle else 0
            if e not in orders:
                orders.clear()
                orders[e] = schedule.order(e).to(x.device)
            idx = orders[e][step % schedule.steps_per_epoch]
            return x[idx], None if y is None else y[idx]

        return self._run_steps(batch, total, start_step, stop_step, callback, check_every, should_stop)

    def fit_batches(self, batches: Iterable, *, epochs: float, steps_per_epoch: Optional[int] = None,
                    to_batch: Optional[Callable] = None, start_step: int = 0, stop_step: Optional[int] = None,
                    callback: Optional[Callable[[int, int, History], None]] = None, check_every: int = 50,
                    should_stop: Optional[Callable[[], bool]] = None) -> History:
        """Train on a stream: ``batches`` is re-iterated every epoch (a ``DataLoader``, or any re-iterable of x or
        (x, y) batches); each batch goes through ``to_batch(batch) -> (x, y or None)`` (default: (x, y) or x as
        they are). With a world, each rank's stream yields that rank's equal share of each global batch (e.g. a
        DataLoader with ``batch_sampler=Schedule(n, batch_size, seed, rank=r, world_size=W)``).

        Args:
            steps_per_epoch: default ``len(batches)``; an iterable without a length needs it.
            start_step: steps already done: the stream skips them (a resumed run needs a deterministic stream).
            Others as ``fit``.
        Raises:
            ValueError: an epoch of the stream ran out before ``steps_per_epoch`` batches.
        """
        if steps_per_epoch is None:
            try:
                steps_per_epoch = len(batches)
            except TypeError:
                raise ValueError("steps_per_epoch: the batches have no len(); give the steps of one epoch") from None
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch: expected at least one batch per epoch, got {steps_per_epoch}")
        to_batch = to_batch or _as_batch
        total = int(round(steps_per_epoch * epochs))
        state = {"epoch": -1, "it": None, "at": 0}

        def batch(step):
            epoch, k = divmod(step, steps_per_epoch)
            if state["epoch"] != epoch or state["at"] > k:
                sampler = getattr(batches, "batch_sampler", None)
                at = 0
                if isinstance(sampler, Schedule):  # starts where asked: a resumed run reads no skipped batch
                    sampler.set_epoch(epoch, first_step=k)
                    at = k
                elif hasattr(getattr(batches, "sampler", None), "set_epoch"):  # e.g. DistributedSampler
                    batches.sampler.set_epoch(epoch)
                state.update(epoch=epoch, it=iter(batches), at=at)
            while True:
                try:
                    item = next(state["it"])
                except StopIteration:
                    raise ValueError(f"batches: epoch {epoch} ended after {state['at']} batches, fewer than the "
                                     f"{steps_per_epoch} steps per epoch") from None
                state["at"] += 1
                if state["at"] > k:
                    return to_batch(item)

        return self._run_steps(batch, total, start_step, stop_step, callback, check_every, should_stop)

    def _run_steps(self, batch: Callable[[int], tuple], total: int, start_step: int, stop_step: Optional[int],
                   callback, check_every: int, should_stop) -> History:
        """Steps start_step .. min(total, stop_step) - 1, ``batch(step) -> (x, y)`` each; the guard, history,
        callbacks, the ranks' final agreement."""
        history = History()
        self.guard.set_step(start_step)
        for step in range(start_step, total if stop_step is None else min(total, stop_step)):
            xb, yb = batch(step)
            self.train_step(xb, yb, step / (total + 1), history)
            history.steps += 1
            if (step + 1) % check_every == 0:
                self.guard.check()
                history.flush()
            if callback is not None:
                callback(step + 1, total, history)
            if should_stop is not None and should_stop():
                break
        self.guard.check()
        history.flush()
        if self.world is not None:  # every rank took the same steps: the same parameters and annealing state
            self.world.check_same([(f"{name}.{k}", v) for name, layer in zip(self.names, self.layers)
                                   for k, v in layer.state_dict().items()])
        if not self._host_control:
            for i in self.gmms:  # the device path passes the smoothing even once it is the identity (exact)
                self.layers[i].refresh_identity()
        return history


def _as_batch(item) -> tuple:
    """A stream's item: (x, y), [x, y], or x alone -> (x, y or None)."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise ValueError(f"batches: expected x or (x, y) batches, got a sequence of {len(item)} items")
    return item, None
