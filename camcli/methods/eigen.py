"""Principal-component maps: EigenCAM, EigenGradCAM, KPCA-CAM (the projection itself, also used by
--eigen-smooth, is in camcli.maps)."""

from __future__ import annotations

import torch
from torch import Tensor

from camcli.maps import first_component, oriented
from camcli.methods.base import CamInputs, register


# The kernel matrix has (h w)^2 entries per image and its eigendecomposition costs (h w)^3: up to
# this many positions it is computed exactly; above, by the Nystrom method on this many landmark
# positions (a 224x336 layer would otherwise need 22 GB for one image).
KPCA_MAX_POSITIONS = 1024
KPCA_LANDMARKS = 1024


def _rbf(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    return torch.exp(-gamma * torch.cdist(a, b).square())


def kernel_first_component(x: Tensor, gamma: float | None = None) -> Tensor:
    """Kernel PCA of (B, K, h, w) with an RBF kernel: the first component's scores -> (B, h, w).

    Positions are the samples, channels the features. k(p, q) = exp(-gamma |a_p - a_q|^2), gamma
    defaults to 1 / K (scikit-learn's default). The kernel matrix is centred in feature space; the
    scores of the top eigenpair (lambda, u) are sqrt(lambda) * u, as scikit-learn's KernelPCA
    returns them. The sign is fixed as for Eigen-CAM. Layers larger than KPCA_MAX_POSITIONS use a
    Nystrom approximation of the kernel (``nystrom_first_component``), at full resolution.
    """
    b, k, h, w = x.shape
    m = x.detach().float().reshape(b, k, h * w).transpose(1, 2)  # (B, hw, K)
    g = 1.0 / k if gamma is None else gamma
    if h * w > KPCA_MAX_POSITIONS:
        proj = torch.stack([nystrom_first_component(m[i], g, KPCA_LANDMARKS) for i in range(b)])
        return oriented(proj, m).reshape(b, h, w)
    kern = _rbf(m, m, g)
    centred = (
        kern
        - kern.mean(dim=1, keepdim=True)
        - kern.mean(dim=2, keepdim=True)
        + kern.mean(dim=(1, 2), keepdim=True)
    )
    vals, vecs = torch.linalg.eigh(centred)
    proj = vecs[:, :, -1] * vals[:, -1:].clamp(min=0).sqrt()
    return oriented(proj, m).reshape(b, h, w)


def nystrom_first_component(m: Tensor, gamma: float, landmarks: int) -> Tensor:
    """The first kernel principal component's scores of one image's positions (P, K) -> (P,), with
    the kernel approximated from ``landmarks`` positions spread evenly over the grid (Williams &
    Seeger 2001): K ~ Phi Phi^T, Phi = K_pl K_ll^(-1/2). Centring Phi over the positions centres the
    approximate kernel in feature space, and the scores are Phi_c v for the top eigenvector v of
    Phi_c^T Phi_c (l x l): exactly sqrt(lambda) u of the approximate kernel, and of the exact one
    when every position is a landmark. Memory and time grow with P * l, not P^2.
    """
    p = m.shape[0]
    idx = torch.linspace(0, p - 1, min(landmarks, p), device=m.device).round().long()
    centres = m[idx]
    vals, vecs = torch.linalg.eigh(_rbf(centres, centres, gamma))
    keep = vals > vals[-1] * 1e-6  # a numerically singular landmark kernel: drop its null directions
    inv_sqrt = (vecs[:, keep] * vals[keep].rsqrt()) @ vecs[:, keep].T
    phi = _rbf(m, centres, gamma) @ inv_sqrt  # (P, l)
    phi = phi - phi.mean(dim=0, keepdim=True)
    _, top = torch.linalg.eigh(phi.T @ phi)
    return phi @ top[:, -1]


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
