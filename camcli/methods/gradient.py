"""Methods that weight the target layer's activations with the gradient of the target score."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from camcli.errors import UsageError
from camcli.methods.base import CamInputs, draw_noise, noise_generator, register, weigh

_EPS = 1e-12


def _ag(inputs: CamInputs, method: str) -> tuple[Tensor, Tensor]:
    return inputs.activations, inputs.gradients


@register(
    "gradcam",
    aliases=("grad-cam", "grad_cam"),
    needs_gradients=True,
    description="channel weights = spatial mean of the gradient",
    paper="Selvaraju et al. 2017, Grad-CAM (arXiv:1610.02391)",
)
def gradcam(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "gradcam")
    return weigh(g.mean(dim=(2, 3)), a)


def gradcampp_weights(a: Tensor, g: Tensor, g2: Tensor | None = None, g3: Tensor | None = None) -> Tensor:
    """Grad-CAM++ channel weights (B, K).

    alpha_kij = G^2 / (2 G^2 + sum_ab A_kab * G^3) (0 where G = 0), w_k = sum_ij alpha_kij ReLU(G_kij).
    ``g2``/``g3`` default to G^2 and G^3; SmoothGrad-CAM++ passes noise-averaged powers instead.
    """
    g2 = g * g if g2 is None else g2
    g3 = g2 * g if g3 is None else g3
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3
    alpha = torch.where((g != 0) & (denom.abs() > _EPS), g2 / torch.where(denom == 0, 1, denom), 0)
    return (alpha * torch.relu(g)).sum(dim=(2, 3))


@register(
    "gradcam++",
    aliases=("gradcampp", "gradcam_pp", "gradcam-pp"),
    needs_gradients=True,
    description="gradient weights with the second/third-order alpha terms of the paper",
    paper="Chattopadhay et al. 2018, Grad-CAM++ (arXiv:1710.11063)",
)
def gradcampp(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "gradcam++")
    return weigh(gradcampp_weights(a, g), a)


@register(
    "xgradcam",
    aliases=("xgrad-cam",),
    needs_gradients=True,
    description="weights = sum(G*A) / sum(A), axiom-based",
    paper="Fu et al. 2020, Axiom-based Grad-CAM (arXiv:2008.02312)",
)
def xgradcam(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "xgradcam")
    sum_a = a.sum(dim=(2, 3))
    sum_ga = (g * a).sum(dim=(2, 3))
    w = torch.where(sum_a.abs() > _EPS, sum_ga / torch.where(sum_a == 0, 1, sum_a), 0)
    return weigh(w, a)


@register(
    "hirescam",
    needs_gradients=True,
    description="element-wise gradient x activation, summed over channels",
    paper="Draelos & Carin 2020, HiResCAM (arXiv:2011.08891)",
)
def hirescam(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "hirescam")
    return g * a


@register(
    "gradcam-elementwise",
    aliases=("gradcamelementwise", "gradcam_elementwise"),
    needs_gradients=True,
    description="ReLU of gradient x activation per element, summed over channels",
    paper="pytorch-grad-cam's GradCAMElementWise (a HiResCAM variant)",
)
def gradcam_elementwise(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "gradcam-elementwise")
    return torch.relu(g * a)


@register(
    "layercam",
    aliases=("layer-cam",),
    needs_gradients=True,
    description="ReLU(gradient) x activation per element; good on early layers",
    paper="Jiang et al. 2021, LayerCAM (IEEE TIP 30)",
)
def layercam(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "layercam")
    return torch.relu(g) * a


@register(
    "counterfactual",
    aliases=("counterfactual-gradcam", "negative-gradcam"),
    needs_gradients=True,
    description="Grad-CAM with negated gradients: regions that argue against the class",
    paper="Selvaraju et al. 2017, Grad-CAM, section 5 (arXiv:1610.02391)",
)
def counterfactual(inputs: CamInputs) -> Tensor:
    a, g = _ag(inputs, "counterfactual")
    return weigh(-g.mean(dim=(2, 3)), a)


def second_order(model: Any, example: Tensor) -> None:  # noqa: ANN401
    """MethodInfo.check for ShapleyCAM: the model must have second derivatives. Fused kernels (the
    flash attention of a CPU ViT, say) implement only the first, which would fail mid-run."""
    x = example.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = model(x)
            first = next((o for o in ([out] if isinstance(out, Tensor) else
                                      (out.values() if isinstance(out, dict) else out)) if isinstance(o, Tensor)), None)
            if first is None:
                return
            (g,) = torch.autograd.grad(first.float().square().sum(), x, create_graph=True)
            if g.requires_grad:
                torch.autograd.grad(g.square().sum(), x, allow_unused=True)
    except RuntimeError as e:
        if "not implemented" in str(e):
            raise UsageError(
                "shapleycam needs second derivatives, and this model uses an operation that has none "
                f"({str(e).splitlines()[0]}); use gradcam, layercam or another first-order method"
            ) from None
        raise


@register(
    "shapleycam",
    aliases=("shapley-cam",),
    needs_gradients=True,
    needs_hvp=True,
    check=second_order,
    extra_forwards="0 (+ a second-order backward to the layer)",
    description="weights = spatial mean of G - H.A / 2, H the Hessian of the score at the layer",
    paper="Cai et al., CAMs as Shapley Value-based Explainers (ShapleyCAM, arXiv:2501.06261)",
)
def shapleycam(inputs: CamInputs) -> Tensor:
    """w_k = mean_ij (G - 0.5 H A)_kij: the gradient with a second-order correction, H A the Hessian of
    y^c w.r.t. A times A itself (the vector pytorch-grad-cam's ShapleyCAM also uses)."""
    a, g = _ag(inputs, "shapleycam")
    hvp = inputs.hvp
    return weigh((g - 0.5 * hvp(a)).mean(dim=(2, 3)), a)


@register(
    "smoothgradcam++",
    aliases=("smoothgradcampp", "smooth-gradcam++", "smoothgradcam_pp"),
    needs_gradients=True,
    needs_gradient_fn=True,
    extra_forwards="N (+ N backward to the layer)",
    description="Grad-CAM++ with gradient powers averaged over N noisy copies of the input",
    paper="Omeiza et al. 2019, Smooth Grad-CAM++ (arXiv:1908.01224)",
)
def smoothgradcampp(inputs: CamInputs) -> Tensor:
    a = inputs.activations
    x = inputs.inputs
    grad_at = inputs.gradient_fn
    opts = inputs.options
    # Noise per image, from its own seeded generator and value range: a map never depends on its batch.
    gens = [noise_generator(opts.seed) for _ in range(x.shape[0])]
    sigma = opts.noise * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1)).view(-1, 1, 1, 1)
    g1 = torch.zeros_like(a)
    g2 = torch.zeros_like(a)
    g3 = torch.zeros_like(a)
    for _ in range(opts.samples):
        noise = draw_noise(gens, x.shape[1:], x.device)
        noisy = x + noise * sigma
        _, g = grad_at(noisy)
        g1 += g
        g2 += g * g
        g3 += g * g * g
    n = opts.samples
    return weigh(gradcampp_weights(a, g1 / n, g2 / n, g3 / n), a)
