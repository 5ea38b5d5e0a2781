"""The DCGMM stack: build from a preset or layer specs, forward, log_prob, classify, fit.

    model = DCGMM("demo", input_shape=(28, 28, 1), n_classes=10, seed=0)
    model.fit(x_train, y_train, epochs=1)            # returns the model; the per-step record in model.history_
    model.log_prob(x_test)                            # {"gmm1": (N,), ...} mean score per image and GMM layer
    model.log_prob(x_test, mask=known)                # the same with unknown pixels marginalised out
    model.predict(x_test), model.predict_proba(x_test)   # (N,) classes, (N, n_classes) probabilities
    model.score_samples(x_test), model.score(x_test)  # (N,) per-image score of the top GMM, its mean
    model.save("m.pt"); DCGMM.load("m.pt")

What ``log_prob`` is: for each GMM layer the mean over its positions of a per-patch score (the mixture
log-likelihood of the patch, "loglik", or the layer's training loss), each layer scoring its own input (images for
the bottom layer, the responsibilities of the layer below for the others). It is a score to compare images under
one model (outliers, classes), not a normalised density of the image: overlapping patches are not independent, so
it does not convert to bits per dimension.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import data, presets, queries
from . import init as init_mod
from .layers import ConvGMM, LinearClassifier, MaxPool
from .types import Backend, Loss
from .presets import Classifier, GMM, LayerSpec, Pool, Preset
from .sampling import Sharpening, check_guidance, classifier_topdown, guided_prior, sample_down
from .train import History, Trainer, _as_batch


#: CPU batches of the batched queries: their largest layer output stays under 16 MB. glibc maps blocks over 32 MB
#: afresh at every allocation and returns them at every free, so larger batches page-fault their outputs in each time:
#: preset D's evaluation of 10,000 test images took 2.2-2.4 s CPU (0.5-0.6 s in the kernel) at 500 images a batch,
#: 1.5-1.6 s at 200 (one thread, 2026-12-04).
CPU_BATCH_BYTES = 16 * 2**20


class DCGMM(nn.Module):
    """A stack of ConvGMM / MaxPool layers with an optional linear classifier on top.

    Layers are named gmm1, pool1, gmm2, ..., classifier (``names``); ``layers`` is an nn.ModuleList.

    Args:
        stack: a preset name (``presets.PRESETS``), a ``Preset``, or a sequence of layer specs
            (``presets.GMM``, ``presets.Pool``, ``presets.Classifier``), bottom-up.
        input_shape: (H, W, C); default the preset's, else (28, 28, 1).
        n_classes: classes of the classifier (ignored when the stack has none).
        backend: ops backend for every ConvGMM.
        seed: seeds the initialisation (None: torch's global RNG).
        dtype: parameter dtype (float32; float64 for tests).
    """

    def __init__(
        self,
        stack: Union[str, Preset, Sequence[LayerSpec]],
        input_shape: Optional[Tuple[int, int, int]] = None,
        n_classes: int = 10,
        *,
        backend: Backend = "auto",
        seed: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if isinstance(stack, (str, Preset)):
            self.preset: Optional[Preset] = presets.get_preset(stack)
            specs = self.preset.layers
            input_shape = self.preset.input_shape if input_shape is None else input_shape
        else:
            self.preset, specs = None, tuple(stack)
            input_shape = (28, 28, 1) if input_shape is None else input_shape
        self.input_shape = tuple(int(v) for v in input_shape)
        self.n_classes = int(n_classes)
        self.specs = tuple(specs)
        g = None if seed is None else torch.Generator().manual_seed(seed)
        layers, names, shape, counts = [], [], self.input_shape, {"gmm": 0, "pool": 0}
        for i, spec in enumerate(self.specs):
            if isinstance(spec, GMM):
                counts["gmm"] += 1
                name = f"gmm{counts['gmm']}"
                fields = {k: v for k, v in vars(spec).items() if k not in ("kernel", "stride", "n_components")}
                layer = ConvGMM(shape, spec.kernel, spec.stride, spec.n_components, backend=backend, dtype=dtype,
                                generator=g, **fields)
            elif isinstance(spec, Pool):
                counts["pool"] += 1
                name = f"pool{counts['pool']}"
                layer = MaxPool(shape, spec.kernel, spec.stride)
            elif isinstance(spec, Classifier):
                if i != len(self.specs) - 1:
                    raise ValueError("stack: the Classifier must be the last layer spec")
                reads = names[-1] if spec.reads is None else spec.reads
                if reads not in names:
                    raise ValueError(f"stack: the classifier reads {reads!r}, which is not one of {names}")
                layer = LinearClassifier(layers[names.index(reads)].out_shape, n_classes, reads=reads, lr=spec.lr,
                                         dtype=dtype, generator=g)
                name = "classifier"
            else:
                raise TypeError(f"stack: expected GMM, Pool or Classifier specs, got {type(spec).__name__}")
            layers.append(layer)
            names.append(name)
            shape = layer.out_shape
        if not layers:
            raise ValueError("stack: expected at least one layer")
        self.layers = nn.ModuleList(layers)
        self.names = names
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    # -------------------------------------------------------------------------------------------- access
    def __getitem__(self, name: str) -> nn.Module:
        return self.layers[self.names.index(name)]

    @property
    def classifier(self) -> Optional[LinearClassifier]:
        last = self.layers[-1]
        return last if isinstance(last, LinearClassifier) else None

    def gmm_layers(self) -> Dict[str, ConvGMM]:
        return OrderedDict((n, m) for n, m in zip(self.names, self.layers) if isinstance(m, ConvGMM))

    def _images(self, x, keep_uint8: bool = False, layout: str = "auto") -> torch.Tensor:
        """Images (N, H, W), NHWC or NCHW (``layout``, see ``data.resolve_layout``) to float (N, H, W, C) in
        [0, 1] on the model's device, shape-checked (uint8 stays uint8 with ``keep_uint8``: training scales each
        batch inside its step)."""
        t = data.to_images(data.to_nhwc(x, self.input_shape, layout), keep_uint8=keep_uint8)
        if tuple(t.shape[1:]) != self.input_shape:
            raise ValueError(f"x: expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(t.shape)}")
        p = next(self.parameters())
        return t.to(device=p.device) if t.dtype == torch.uint8 else t.to(device=p.device, dtype=p.dtype)

    # -------------------------------------------------------------------------------------------- inference
    def forward(self, x, *, layout: str = "auto") -> Dict[str, torch.Tensor]:
        """Every layer's output: responsibilities (N, H', W', K) for GMMs, pooled maps, logits (N, n_classes).
        x: images (N, H, W), (N, H, W, C) or (N, C, H, W) (``layout``: "auto", "NHWC" or "NCHW"), every method."""
        h = self._images(x, layout=layout)
        outputs: Dict[str, torch.Tensor] = OrderedDict()
        for name, layer in zip(self.names, self.layers):
            if isinstance(layer, LinearClassifier):
                h = layer(outputs[layer.reads])
            elif isinstance(layer, ConvGMM):
                h = layer.cgmm(h, check=False).resp  # images checked once above
            else:
                h = layer(h)
            outputs[name] = h
        return outputs

    @torch.no_grad()
    def log_prob(self, x, mask=None, *, loss: Optional[Loss] = "loglik", batch_size: Optional[int] = None,
                 layout: str = "auto") -> Dict[str, torch.Tensor]:
        """Per GMM layer, each image's mean score over positions, (N,) (higher is better): a per-patch score
        averaged over the layer's positions, not a normalised image density (see the module docstring).

        Args:
            mask: None, or bool pixels, True = observed ((H, W), (N, H, W) or x's shape, as ``inpaint``): the
                unknown pixels are marginalised out. The bottom GMM is exact: each patch's diagonal GMM with its
                unknown entries dropped (``queries.marginal_cgmm``; a patch with no observed pixel scores 0 and
                passes up the prior pi). The layers above score the bottom layer's responsibilities given the
                observed pixels (its posterior), as they score any input: their numbers are not marginals over
                pixels. An all-True mask gives exactly the unmasked result. Needs a GMM as the bottom layer; with a
                mask the bottom layer's score is always "loglik".
            loss: "loglik" (default: the mixture log-likelihood per patch), "mc" (max-component with the
                current smoothing), or None (each layer's training loss).
            batch_size: images per forward, as in every batched query (``evaluate``, ``classify``, ...): default
                500 on a GPU; on CPU as many as keep the largest layer output of a batch within 16 MB (preset D:
                248), so that the allocator reuses its blocks instead of mapping fresh pages for every batch.
        """
        resolved = data.resolve_layout(torch.as_tensor(x).shape, self.input_shape, layout)
        images = self._images(x, layout=resolved)
        if mask is None:
            return self._scores_and_predictions(images, loss, batch_size, False)[0]
        m = self._mask(mask, images, resolved)
        if not isinstance(self.layers[0], ConvGMM):
            raise ValueError("mask: a marginal query needs a GMM as the bottom layer")
        return self._scores_and_predictions(images, loss, batch_size, False, None if bool(m.all()) else m)[0]

    @torch.no_grad()
    def predict_components(self, x, *, batch_size: Optional[int] = None,
                           layout: str = "auto") -> Dict[str, torch.Tensor]:
        """Per GMM layer the most responsible component of every position, (N, H', W') int64 (argmax of the
        responsibilities, ties -> lowest index): the layer's cluster assignment, as ``GaussianMixture.predict``."""
        x = self._images(x, layout=layout)
        batch_size = self._batch_size(x, batch_size)
        out = OrderedDict((n, torch.empty(x.shape[0], *self[n].out_shape[:2], dtype=torch.int64, device=x.device))
                          for n in self.gmm_layers())  # filled batch by batch (see _scores_and_predictions)
        for start in range(0, x.shape[0], batch_size):
            outputs = self.forward(x[start:start + batch_size], layout="NHWC")
            for name in out:
                out[name][start:start + batch_size] = outputs[name].argmax(-1)
        return out

    # -------------------------------------------------------------------------------------------- scikit-learn
    @torch.no_grad()
    def predict_proba(self, x, *, batch_size: Optional[int] = None, layout: str = "auto") -> torch.Tensor:
        """Class probabilities (N, n_classes): the softmax of the linear read-out."""
        if self.classifier is None:
            raise ValueError("predict_proba: this stack has no classifier")
        x = self._images(x, layout=layout)
        batch_size = self._batch_size(x, batch_size)
        probs = x.new_empty(x.shape[0], self.n_classes)  # filled batch by batch (see _scores_and_predictions)
        for s in range(0, x.shape[0], batch_size):
            probs[s:s + batch_size] = torch.softmax(self.forward(x[s:s + batch_size], layout="NHWC")["classifier"], 1)
        return probs

    def predict(self, x, *, batch_size: Optional[int] = None, layout: str = "auto") -> torch.Tensor:
        """Predicted classes (N,) int64: the argmax of ``predict_proba`` (``classify``)."""
        return self.classify(x, batch_size=batch_size, layout=layout)

    def score_samples(self, x, *, layer: Optional[str] = None, loss: Optional[Loss] = None,
                      layout: str = "auto") -> torch.Tensor:
        """(N,) per-image score of GMM ``layer`` (default the top GMM, with its training loss): the mean over its
        positions of the per-patch score, the quantity ``outlier_scores`` ranks by. Higher = more typical. A score,
        not a normalised log density (see ``log_prob``)."""
        return self.outlier_scores(x, layer=layer, loss=loss, layout=layout)

    def score(self, x, *, layer: Optional[str] = None, loss: Optional[Loss] = None, layout: str = "auto") -> float:
        """The mean of ``score_samples`` over x."""
        return float(self.score_samples(x, layer=layer, loss=loss, layout=layout).double().mean())

    def save(self, path: str) -> None:
        """Write the model (architecture, parameters, annealing state) to ``path`` in the safe checkpoint format,
        atomically (``checkpoint.save_checkpoint``)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(path, self)

    @classmethod
    def load(cls, path: str, *, backend: Backend = "auto", map_location="cpu") -> "DCGMM":
        """The model saved at ``path`` (``save`` or ``dcgmm train``'s checkpoint; loaded with weights_only=True).
        Raises checkpoint.CheckpointError naming the file when it is missing, damaged or not a model."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, backend=backend, map_location=map_location)[0]

    @torch.no_grad()
    def evaluate(self, x, *, batch_size: Optional[int] = None, layout: str = "auto"
                 ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """One pass over x for both: ``log_prob(x)`` (each GMM layer's per-image mean "loglik" score, (N,)) and
        ``classify(x)`` ((N,) predictions, None without a classifier). The responsibilities passed up do not
        depend on the loss (design.md), so one forward serves both (half the work of calling the two)."""
        return self._scores_and_predictions(self._images(x, layout=layout), "loglik", batch_size,
                                            self.classifier is not None)

    def _batch_size(self, x: torch.Tensor, batch_size: Optional[int]) -> int:
        """Images per forward of the batched queries: ``batch_size`` if given (a positive integer), else 500 on a
        GPU and on CPU as many as keep the largest layer output of a batch within ``CPU_BATCH_BYTES``."""
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
                raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
            return int(batch_size)
        if x.device.type != "cpu":
            return 500
        per_image = max(math.prod(layer.out_shape) for layer in self.layers) * x.element_size()
        return max(1, min(500, CPU_BATCH_BYTES // per_image))

    def _scores_and_predictions(self, x: torch.Tensor, loss: Optional[Loss], batch_size: Optional[int],
                                predict: bool, mask: Optional[torch.Tensor] = None):
        """Batches of x (N, H, W, C) up the stack: ({GMM: (N,) mean score}, (N,) predictions or None). mask (x's
        shape, bool): the bottom GMM scores the observed pixels' marginal (``queries.marginal_cgmm``)."""
        batch_size = self._batch_size(x, batch_size)
        n = x.shape[0]
        # outputs allocated before the first batch and filled batch by batch (as in every batched query here): small
        # results kept from each batch would sit above that batch's freed buffers in the C allocator's heap and keep
        # it from shrinking (preset D's evaluation of 10,000 test images grew the process by 550 MB)
        scores = OrderedDict((name, x.new_empty(n)) for name in self.gmm_layers())
        preds = torch.empty(n, dtype=torch.int64, device=x.device) if predict else None
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            h, outputs = x[start:stop], {}
            for i, (name, layer) in enumerate(zip(self.names, self.layers)):
                if isinstance(layer, ConvGMM) and i == 0 and mask is not None:
                    h, score = queries.marginal_cgmm(layer, h, mask[start:stop])
                    scores[name][start:stop] = score.mean(dim=(1, 2))
                elif isinstance(layer, ConvGMM):
                    out = layer.cgmm(h, loss=loss, check=False)
                    scores[name][start:stop] = out.score.mean(dim=(1, 2))
                    h = out.resp
                elif isinstance(layer, MaxPool):
                    h = layer(h)
                elif predict:
                    h = layer(outputs[layer.reads])
                    preds[start:stop] = h.argmax(1)
                outputs[name] = h
        return scores, preds

    @torch.no_grad()
    def classify(self, x, *, batch_size: Optional[int] = None, layout: str = "auto") -> torch.Tensor:
        """Predicted classes (N,) int64 from the linear classifier."""
        if self.classifier is None:
            raise ValueError("classify: this stack has no classifier")
        x = self._images(x, layout=layout)
        batch_size = self._batch_size(x, batch_size)
        preds = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)  # filled batch by batch
        for s in range(0, x.shape[0], batch_size):
            preds[s:s + batch_size] = self.forward(x[s:s + batch_size])["classifier"].argmax(1)
        return preds

    # -------------------------------------------------------------------------------------------- generation
    def _top_gmm(self) -> str:
        return list(self.gmm_layers())[-1]

    @torch.no_grad()
    def sample(self, n: int, *, layer: Optional[str] = None, classes=None, top_s=None, divisor=None,
               sharpening: Union[None, bool, Sharpening, Dict[str, Sharpening]] = None,
               guidance: Optional[float] = 3.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw n images top-down (spec 3.1), each layer's sample the prior of the layer below.

        Args:
            layer: start at this GMM or pool (default: the top GMM) with a uniform prior.
            classes: class-conditional sampling through the classifier's backward (spec 3.2): a list of n classes
                (one per sample), or of any other length (each sample draws one of them uniformly).
            guidance: class-conditional only. A float g: the prior at the classifier's input is the model's own
                top-down sample there (from the top GMM, not sharpened, so the samples of a class differ in shape) times
                exp(g * (X - max X)), X the classifier's backward of the class (``sampling.guided_prior``). None:
                X alone, as the original (spec 3.2): a fixed function of the class, so the samples of one class
                differ only in the draws below it. Stacks with no GMM above the classifier's input use X either way.
            top_s, divisor: per-GMM sampling settings (an int/float for all, or a dict by layer name; default
                each layer's own, e.g. top_s 3 and divisor 20 in the presets).
            sharpening: None: each GMM's own default (the preset's, e.g. 300 iterations on preset D's gmm1 and
                gmm2); False: off; a ``Sharpening`` for every GMM; or a dict by GMM name (spec 3.3).
            generator: torch.Generator for every random draw (the same seed gives the same samples).
        Returns:
            (n, H, W, C) images clipped to [0, 1].
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n: expected a positive number of samples, got {n!r}")
        if guidance is not None:
            check_guidance(guidance)  # named here, also for stacks where it would go unused
        p = next(self.parameters())
        if classes is not None:
            clf = self.classifier
            if clf is None:
                raise ValueError("classes: class-conditional sampling needs a classifier")
            choice = _class_ids("classes", classes).reshape(-1)
            if choice.numel() == 0 or bool((choice < 0).any()) or bool((choice >= self.n_classes).any()):
                raise ValueError(f"classes: expected class ids in [0, {self.n_classes}), got {classes!r}")
            if choice.numel() != n:
                choice = choice[torch.randint(0, choice.numel(), (n,), generator=generator)]
            start, topdown = clf.reads, classifier_topdown(clf, choice.to(p.device))
            top = self._top_gmm()
            if guidance is not None and self.names.index(top) > self.names.index(start):
                ones = torch.ones(n, *self[top].out_shape, dtype=p.dtype, device=p.device)
                # not sharpened: a sharpened map is nearly one-hot per position, and the class prior could no
                # longer reorder its components (measured: 37% of preset D's samples as their class, against 100%)
                own = sample_down(self.layers, self.names, top, ones, generator=generator, top_s=top_s,
                                  divisor=divisor, sharpening=False, stop=start)
                topdown = guided_prior(own, topdown, guidance)
        else:
            start = self._top_gmm() if layer is None else layer
            if start not in self.names or isinstance(self[start], LinearClassifier):
                raise ValueError(f"layer: expected a GMM or pool layer of {self.names[:-1]}, got {start!r}")
            topdown = torch.ones(n, *self[start].out_shape, dtype=p.dtype, device=p.device)
        x = sample_down(self.layers, self.names, start, topdown, generator=generator, top_s=top_s, divisor=divisor,
                        sharpening=sharpening)
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def variants(self, x, *, root: Optional[str] = None, top_s=None, divisor=None, sharpening=None,
                 generator: Optional[torch.Generator] = None, layout: str = "auto") -> torch.Tensor:
        """Variants of real images (spec 3.4): the responsibilities of GMM ``root`` (default: the top GMM) for x
        are the prior of sampling from ``root`` down. Returns images in [0, 1] in x's layout."""
        root = self._top_gmm() if root is None else root
        if root not in self.gmm_layers():
            raise ValueError(f"root: expected one of the GMM layers {list(self.gmm_layers())}, got {root!r}")
        resolved = data.resolve_layout(torch.as_tensor(x).shape, self.input_shape, layout)
        topdown = self.forward(x, layout=resolved)[root]
        h = sample_down(self.layers, self.names, root, topdown, generator=generator, top_s=top_s, divisor=divisor,
                        sharpening=sharpening)
        return _in_layout(h.clamp(0.0, 1.0), resolved)

    @torch.no_grad()
    def inpaint(self, x, mask, *, mode: str = "sample", root: Optional[str] = None, top_s=None, divisor=None,
                sharpening=None, fill: Optional[float] = None, iterations: int = 3,
                generator: Optional[torch.Generator] = None, layout: str = "auto") -> torch.Tensor:
        """Complete the pixels where ``mask`` is False: ``mode="sample"`` from variants of the masked images
        (spec 3.4), ``mode="mpe"`` deterministically from the bottom GMM (per patch the most probable component
        given its observed pixels, its mean, averaged over the patches covering each pixel, no noise:
        ``queries.mpe_completion``; root, sampling and iteration arguments do not apply).

        The missing pixels start at ``fill``; each iteration replaces them with a variant of the current
        completion (known pixels reset every time). The original: ``fill=0.0, iterations=1`` (black missing
        pixels, which the model then explains as background: the completions of preset D come out dark); the
        default starts from each image's mean known pixel and iterates 3 times (docs/results.md, in-painting).

        Args:
            x: images (N, H, W[, C]) or (N, C, H, W) (``layout``).
            mask: bool, True = known pixel; (H, W), (N, H, W), or x's shape, any pattern.
            fill: start value of the missing pixels; None: each image's mean over its known pixels.
            iterations: variant rounds (>= 1).
        Returns:
            images in x's layout: known pixels bit-identical to x, the others from the model.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations: expected an int >= 1, got {iterations!r}")
        if fill is not None and not math.isfinite(float(fill)):
            raise ValueError(f"fill: expected a finite value or None, got {fill!r}")
        if mode not in ("sample", "mpe"):
            raise ValueError(f"mode: expected 'sample' or 'mpe', got {mode!r}")
        resolved = data.resolve_layout(torch.as_tensor(x).shape, self.input_shape, layout)
        x = self._images(x, layout=resolved)
        m = self._mask(mask, x, resolved)
        if mode == "mpe":
            if not isinstance(self.layers[0], ConvGMM):
                raise ValueError("mode: 'mpe' needs a GMM as the bottom layer")
            return _in_layout(queries.mpe_completion(self.layers[0], x, m), resolved)
        if fill is None:
            known = m.to(x.dtype)
            start = (x * known).sum(dim=(1, 2, 3), keepdim=True) / known.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
        else:
            start = torch.full((), float(fill), dtype=x.dtype, device=x.device)
        current = torch.where(m, x, start.expand_as(x))
        for _ in range(iterations):
            v = self.variants(current, root=root, top_s=top_s, divisor=divisor, sharpening=sharpening,
                              generator=generator, layout="NHWC")
            current = torch.where(m, x, v)
        return _in_layout(current, resolved)

    def _mask(self, mask, x: torch.Tensor, resolved: str) -> torch.Tensor:
        """A pixel mask (True = observed) as x's (N, H, W, C) bool: (H, W), (N, H, W) or x's shape in its layout."""
        m = torch.as_tensor(mask, device=x.device)
        if m.dim() == 4 and resolved == "NCHW":
            m = m.permute(0, 2, 3, 1)
        if m.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = known pixel), got {m.dtype}")
        if m.dim() == 2:
            m = m[None]
        if m.dim() == 3:
            m = m[..., None]
        try:
            return m.expand_as(x)
        except RuntimeError:
            raise ValueError(f"mask: shape {tuple(torch.as_tensor(mask).shape)} does not fit images "
                             f"{tuple(x.shape)}") from None

    @torch.no_grad()
    def outlier_scores(self, x, *, layer: Optional[str] = None, loss: Optional[Loss] = None,
                       layout: str = "auto") -> torch.Tensor:
        """Per-image outlier score (spec 3.5): the mean over positions of GMM ``layer``'s score (default: the top
        GMM, with its training loss, i.e. "mc" with the current smoothing). Higher = more typical. (N,)"""
        layer = self._top_gmm() if layer is None else layer
        if layer not in self.gmm_layers():
            raise ValueError(f"layer: expected one of the GMM layers {list(self.gmm_layers())}, got {layer!r}")
        return self.log_prob(x, loss=loss, layout=layout)[layer]

    # -------------------------------------------------------------------------------------------- training
    def fit(self, x, y=None, *, epochs: Optional[float] = None, batch_size: Optional[int] = None, optimizer=None,
            lr: Optional[float] = None, seed: Optional[int] = None, reshuffle: bool = False, compile=False,
            resume: bool = False, stop_step: Optional[int] = None, callback=None, should_stop=None,
            world=None, layout: str = "auto", steps_per_epoch: Optional[int] = None, verbose: bool = True,
            fused_step: Optional[bool] = None) -> "DCGMM":
        """Train layer by layer (``train.Trainer``), as the original: bottom-up, no gradient between layers.
        Returns the model (scikit-learn's convention: ``model.fit(x, y).predict(x_test)``); this call's per-step
        record is ``model.history_`` (a ``train.History``).

        Args:
            x: images (N, H, W), (N, H, W, C) or (N, C, H, W) (``layout``), uint8 (divided by 255) or float in
                [0, 1], as a tensor or array (kept where it lies, uint8 stays uint8); or a stream: a
                ``DataLoader`` or any re-iterable of x or (x, y) batches (e.g. torchvision's NCHW batches), taken
                in its own order, re-iterated every epoch (``schedule.Schedule`` as its batch sampler gives the
                in-memory order).
            y: (N,) integer labels for the classifier (None: the classifier is not trained; a stream brings its
                own).
            epochs: default the preset's; batch_size: default the preset's (100); a stream's batches are its own.
            optimizer: None (the original rule), "sgd", "adam" or a factory (see ``Trainer``).
            seed: seeds the training order (None: torch's global RNG); reshuffle: a new seeded order every epoch
                (default: the original's one order for every epoch).
            compile: capture the whole training step with torch.compile(fullgraph=True): True (inductor) or a
                torch.compile backend name (see ``Trainer``).
            resume: continue the same schedule (same epochs, batch size and seed) after ``steps_done`` steps.
            stop_step: stop before this step of the schedule (None: train to the end).
            callback: called after every step with (step, total_steps, history).
            should_stop: asked after every step; True ends training there (``steps_done`` counts that step).
            world: a ``distributed.World`` to train data-parallel in; None: the initialised default process group
                when it has more than one rank (``torchrun``), else this process alone. ``batch_size`` is the
                global batch; every rank passes the same x, y, seed and schedule and takes its share (a stream:
                each rank's yields its share).
            layout: "auto" (the reading that fits the model's input shape), "NHWC" or "NCHW".
            steps_per_epoch: a stream without len(): its batches per epoch.
            verbose: a progress bar on stderr (tqdm, when installed; rank 0 only); False: silent.
            fused_step: each layer's step by the two fused step ops instead of autograd (``Trainer``): None (where a
                layer runs on the cuda backend), True (every layer), False (never).
        Returns:
            self; ``self.history_``: train.History with per-step scores, som_sigma and classifier metrics.
        """
        epochs = (self.preset.epochs if self.preset else 10) if epochs is None else epochs
        batch_size = (self.preset.batch_size if self.preset else 100) if batch_size is None else batch_size
        trainer = Trainer(self.layers, self.names, optimizer=optimizer, lr=lr, compile=compile, world=world,
                          fused_step=fused_step)
        start = int(self.steps_done) if resume else 0
        bar = _ProgressBar(callback, f"fit {self.preset.name if self.preset else 'stack'}") \
            if verbose and (trainer.world is None or trainer.world.rank == 0) else None
        callback = bar if bar is not None else callback
        try:
            history = self._fit(trainer, x, y, epochs, batch_size, seed, reshuffle, start, stop_step, callback,
                                should_stop, layout, steps_per_epoch)
        finally:
            if bar is not None:
                bar.close()
        self.steps_done += history.steps
        self.history_ = history
        return self

    def _fit(self, trainer, x, y, epochs, batch_size, seed, reshuffle, start, stop_step, callback, should_stop,
             layout, steps_per_epoch) -> History:
        if _is_stream(x):
            if y is not None:
                raise ValueError("y: a stream of batches brings its own labels ((x, y) batches); pass y=None")
            if start == 0 and int(self.steps_done) == 0 and any(
                    isinstance(m, ConvGMM) and m.init != "uniform" for m in self.layers):
                first = self._batch(next(iter(x)), layout)[0]  # init from data: the stream's first batch
                init_mod.init_from_data(list(self.layers), data.to_images(first) if first.dtype == torch.uint8
                                        else first, seed=seed)
            history = trainer.fit_batches(x, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                          to_batch=lambda item: self._batch(item, layout), start_step=start,
                                          stop_step=stop_step, callback=callback, should_stop=should_stop)
        else:
            x = self._images(x, keep_uint8=True, layout=layout)  # a uint8 data set stays uint8 on the device
            y = None if y is None else self._labels(y, x.shape[0])
            if start == 0 and int(self.steps_done) == 0:  # init="data" / "kmeans++" layers, before the first step
                first = x[:init_mod.POOL_IMAGES]
                init_mod.init_from_data(list(self.layers), data.to_images(first) if first.dtype == torch.uint8
                                        else first, seed=seed)
            history = trainer.fit(x, y, epochs=epochs, batch_size=batch_size, seed=seed, reshuffle=reshuffle,
                                  start_step=start, stop_step=stop_step, callback=callback, should_stop=should_stop,
                                  check_data=False)  # _images checked them
        return history

    def _labels(self, y, n: int) -> torch.Tensor:
        y = _class_ids("y", y).to(next(self.parameters()).device)
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y: expected ({n},) labels, got {tuple(y.shape)}")
        if bool((y < 0).any()) or bool((y >= self.n_classes).any()):
            raise ValueError(f"y: labels must lie in [0, {self.n_classes}), got [{int(y.min())}, {int(y.max())}]")
        return y

    def _batch(self, item, layout: str):
        """A stream's item, x or (x, y) -> (x NHWC on the model's device (uint8 kept), y or None), checked."""
        xb, yb = _as_batch(item)
        xb = self._images(xb, keep_uint8=True, layout=layout)
        return xb, None if yb is None else self._labels(yb, xb.shape[0])


class _ProgressBar:
    """A training callback that draws a tqdm bar (nothing when tqdm is not installed) and calls ``callback``."""

    def __init__(self, callback, desc: str):
        self.callback, self.desc, self.bar = callback, desc, None

    def __call__(self, step: int, total: int, history) -> None:
        if self.bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.bar = False
            else:
                self.bar = tqdm(total=total, initial=step - 1, desc=self.desc, unit="step", dynamic_ncols=True)
        if self.bar:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(step, total, history)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _is_stream(x) -> bool:
    """A DataLoader or another iterable of batches, not one array of images."""
    return not isinstance(x, (torch.Tensor, np.ndarray, list, tuple)) and hasattr(x, "__iter__")


def _in_layout(images: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, H, W, C) -> the caller's layout (NCHW: a contiguous copy)."""
    return images.permute(0, 3, 1, 2).contiguous() if layout == "NCHW" else images


def _class_ids(name: str, value) -> torch.Tensor:
    """Integer class ids as int64; float or bool values are refused (2.9 must not become class 2 silently)."""
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer class labels, got {t.dtype}")
    return t.to(torch.int64)
