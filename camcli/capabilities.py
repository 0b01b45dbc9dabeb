"""What the engine lends a method, built in one typed place.

A method declares what it needs in its registry entry (``needs_gradients``, ``needs_scorer``,
``needs_layer_scorer``, ``needs_gradient_fn``, ``needs_classifier``, ``pixel_space``, ...) and reads it
from its :class:`CamInputs`, which asks :meth:`ModelAccess.lend` the first time: gradients, scorers
and the like are built only when a method reads them, once per batch and target (or layer). Every model call made on a method's behalf goes through here: the layer taps
are paused (or substitute an activation) through ``LayerTap.paused``, and the scalar to explain
always comes from the target object.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from camcli.hooks import GuidedReLUMode, LayerTap
from camcli.layouts import NCHW, LayerLayouts, Layout
from camcli.methods import CamInputs, MethodInfo, MethodOptions
from camcli.targets import Target

Forward = Callable[[Tensor], Tensor]  # preprocessed batch -> logits


class ModelAccess:
    """Model calls for one batch ``x`` and one ``target``, with the layer taps handled."""

    def __init__(
        self, forward: Forward, tap: LayerTap, x: Tensor, target: Target, *,
        model: nn.Module | None = None, logits: Tensor | None = None, layouts: LayerLayouts | None = None,
        layers: Sequence[str] = (), gradients: Callable[[], Sequence[Tensor]] | None = None,
    ) -> None:
        self.forward = forward
        self.tap = tap
        self.x = x
        self.target = target
        self.model = model  # frozen, in eval mode (FullGrad)
        self.logits = logits  # the batch's forward output, its graph retained (Hessian-vector products)
        self.layouts = layouts  # each layer's layout: methods see (B, C, h, w), the model its own shape
        self.layers = tuple(layers)
        self.gradients = gradients  # () -> d target score / d each layer's activation, (B, K, h, w); None: no graph
        self._gradients: dict[str, Tensor] | None = None
        self._guided: Tensor | None = None

    def _layout(self, layer: str, raw: Tensor) -> Layout:
        return NCHW() if self.layouts is None else self.layouts.bind(layer, raw, self.x)

    def _rows(self, n: int, image_index: int | None = None) -> Tensor:
        if image_index is None:
            return torch.arange(n, device=self.x.device)
        return torch.full((n,), image_index, dtype=torch.long, device=self.x.device)

    def scorer(self, inputs: Tensor, image_index: int) -> Tensor:
        """Target scores (N,) of N modified copies of image ``image_index``; no gradients, taps paused."""
        with self.tap.paused(), torch.inference_mode():
            return self.target.score(self.forward(inputs), self._rows(inputs.shape[0], image_index)).float()

    def layer_scorer(self, layer: str) -> Callable[[int, Tensor], Tensor]:
        """(image_index, activations (N, K, h, w)) -> target scores (N,) with ``layer``'s output replaced."""

        raw = self.tap.activations[layer].detach()
        layout = self._layout(layer, raw)

        def score(image_index: int, activations: Tensor) -> Tensor:
            n = activations.shape[0]
            # back to the layer's own layout; prefix tokens come from the image's original output
            own = layout.from_nchw(activations, raw[image_index : image_index + 1])
            with self.tap.paused({layer: own}), torch.inference_mode():
                batch = self.x[image_index : image_index + 1].expand(n, *self.x.shape[1:])
                return self.target.score(self.forward(batch), self._rows(n, image_index)).float()

        return score

    def gradient_fn(self, layer: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """x' (B, 3, H, W), a modified copy of the batch -> (A, dy/dA) at ``layer``, for this target."""

        def grad_at(x: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                out = self.forward(x)
                a = self.tap.activations[layer]
                (g,) = torch.autograd.grad(self.target.score(out, self._rows(x.shape[0])).sum(), a)
            layout = self._layout(layer, a)
            return layout.to_nchw(a.detach()).float(), layout.to_nchw(g).float()

        return grad_at

    def guided(self) -> Tensor:
        """Guided-backprop gradient of the target w.r.t. the input (B, 3, H, W); computed once."""
        if self._guided is None:
            with self.tap.paused():
                xg = self.x.detach().clone().requires_grad_(True)
                with torch.enable_grad(), GuidedReLUMode():
                    out = self.forward(xg)
                    (g,) = torch.autograd.grad(self.target.score(out, self._rows(xg.shape[0])).sum(), xg)
            self._guided = g
        return self._guided

    def hvp(self, layer: str) -> Callable[[Tensor], Tensor]:
        """v -> H v, H the Hessian of the target score w.r.t. ``layer``'s activation, from the batch's
        retained forward graph (no new forward). The double-backward graph lives only inside the call,
        so nothing that holds it outlives it and memory stays flat over a long run."""
        a = self.tap.activations[layer]
        layout = self._layout(layer, a)

        def hv(v: Tensor) -> Tensor:
            if self.logits is None:
                raise RuntimeError("engine bug: Hessian-vector products need the batch's logits")
            with torch.enable_grad():
                score = self.target.score(self.logits, self._rows(self.logits.shape[0])).sum()
                (g,) = torch.autograd.grad(score, a, retain_graph=True, create_graph=True)
                if not g.requires_grad:  # the score is linear in the activation: H = 0
                    return torch.zeros_like(v)
                own = layout.from_nchw(v, a.detach())
                (out,) = torch.autograd.grad(g, a, grad_outputs=own, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if out is None else layout.to_nchw(out.detach())

        return hv

    def paused_forward(self, x: Tensor) -> Tensor:
        """The model's scores for ``x`` with the taps paused (the batch's recorded activations stay)."""
        with self.tap.paused():
            return self.forward(x)

    def score_fn(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> (B,) target scores with gradients on and the taps paused, so a method can
        take gradients anywhere below the layer (FullGrad: the input and every biased layer)."""
        with self.tap.paused(), torch.enable_grad():
            return self.target.score(self.forward(x), self._rows(x.shape[0]))

    def layer_gradients(self, layer: str) -> Tensor:
        """d score / d ``layer``'s activation (B, K, h, w) in fp32; every layer's in one backward, on first use."""
        if self._gradients is None:
            if self.gradients is None:
                raise RuntimeError("engine bug: gradients asked of a batch whose forward kept no graph")
            self._gradients = dict(zip(self.layers, (g.detach().float() for g in self.gradients())))
        return self._gradients[layer]

    def lend(self, what: str, layer: str) -> Any:  # noqa: ANN401
        """A capability for ``layer``, built now (camcli.methods.base.CamInputs asks on first use)."""
        if what == "gradients":
            return self.layer_gradients(layer)
        if what == "scorer":
            return self.scorer
        if what == "layer_scorer":
            return self.layer_scorer(layer)
        if what == "gradient_fn":
            return self.gradient_fn(layer)
        if what == "guided_gradients":
            return self.guided()
        if what == "hvp":
            return self.hvp(layer)
        if what == "score_fn":
            return self.score_fn
        raise RuntimeError(f"engine bug: nothing lends {what!r}")

    def inputs_for(
        self, method: MethodInfo, layer: str, activations: Tensor, classifier: Tensor | None, options: MethodOptions
    ) -> CamInputs:
        """The context ``method`` reads for one layer: what it declared, built when first read.

        Activations and gradients arrive in fp32 whatever precision the forward ran at: methods
        square and cube gradients (Grad-CAM++), which underflow in half precision.
        """
        return CamInputs(
            activations.detach().float(), self.target.classes.clamp(min=0), options=options, method=method,
            layer=layer, lender=self, inputs=self.x, model=self.model, forward=self.paused_forward,
            classifier_weights=classifier,
        )
