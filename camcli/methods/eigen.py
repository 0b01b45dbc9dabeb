"""Principal-component maps: EigenCAM, EigenGradCAM, KPCA-CAM (the projection itself, also used by
--eigen-smooth, is in camcli.maps)."""

from __future__ import annotations

import torch
from torch import Tensor

from camcli.maps import first_component, oriented
from camcli.methods.base import CamInputs, register


# The kernel matrix has (h w)^2 entries per image and its eigendecomposition costs (h w)^3: above
# this many positions the activations are average-pooled to a grid of at most this size first, and
# the map is upsampled back (a 224x336 layer would otherwise need 22 GB for one image).
KPCA_MAX_POSITIONS = 1024


def kernel_first_component(x: Tensor, gamma: float | None = None) -> Tensor:
    """Kernel PCA of (B, K, h, w) with an RBF kernel: the first component's scores -> (B, h, w).

    Positions are the samples, channels the features. k(p, q) = exp(-gamma |a_p - a_q|^2), gamma
    defaults to 1 / K (scikit-learn's default). The kernel matrix is centred in feature space; the
    scores of the top eigenpair (lambda, u) are sqrt(lambda) * u, as scikit-learn's KernelPCA
    returns them. The sign is fixed as for Eigen-CAM. Layers larger than KPCA_MAX_POSITIONS are
    pooled first and the map upsampled back to (h, w).
    """
    b, k, h, w = x.shape
    if h * w > KPCA_MAX_POSITIONS:
        scale = (KPCA_MAX_POSITIONS / (h * w)) ** 0.5
        gh, gw = max(1, int(h * scale)), max(1, int(w * scale))
        small = torch.nn.functional.adaptive_avg_pool2d(x.detach().float(), (gh, gw))
        coarse = kernel_first_component(small, gamma)
        return torch.nn.functional.interpolate(coarse[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    m = x.detach().float().reshape(b, k, h * w).transpose(1, 2)  # (B, hw, K)
    g = 1.0 / k if gamma is None else gamma
    kern = torch.exp(-g * torch.cdist(m, m).square())
    centred = (
        kern
        - kern.mean(dim=1, keepdim=True)
        - kern.mean(dim=2, keepdim=True)
        + kern.mean(dim=(1, 2), keepdim=True)
    )
    vals, vecs = torch.linalg.eigh(centred)
    proj = vecs[:, :, -1] * vals[:, -1:].clamp(min=0).sqrt()
    return oriented(proj, m).reshape(b, h, w)


@register(
    "eigencam",
    aliases=("eigen-cam",),
    needs_target=False,
    description="first principal component of the activations (class-agnostic)",
    paper="Muhammad & Yeasin 2020, Eigen-CAM (arXiv:2008.00299)",
)
def eigencam(inputs: CamInputs) -> Tensor:
    return first_component(inputs.activations)


@register(
    "eigengradcam",
    aliases=("eigen-gradcam",),
    needs_gradients=True,
    description="first principal component of gradient x activation (class-specific)",
    paper="pytorch-grad-cam's EigenGradCAM (Eigen-CAM on G*A)",
)
def eigengradcam(inputs: CamInputs) -> Tensor:
    g = inputs.gradients
    return first_component(g * inputs.activations)


@register(
    "kpca-cam",
    aliases=("kpcacam", "kpca_cam"),
    needs_target=False,
    description="first kernel principal component (RBF, gamma = 1/K) of the activations (class-agnostic)",
    paper="Karmani et al. 2024, KPCA-CAM (arXiv:2410.00267)",
)
def kpcacam(inputs: CamInputs) -> Tensor:
    return kernel_first_component(inputs.activations)
