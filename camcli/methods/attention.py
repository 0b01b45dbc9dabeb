"""Maps from a ViT's attention matrices: attention rollout and gradient-weighted attention.

timm computes attention with fused scaled-dot-product kernels, so the attention matrix never
exists as a tensor. ``AttentionTap`` hooks every global self-attention module and recomputes its
output with the matrix written out (softmax(q k^T / sqrt(d)) v, then the output projection): the
forward result is the same, the matrices are kept in call order, and gradients flow through them.

Readable modules: timm's ``Attention`` (ViT, DeiT, ...) and ``torch.nn.MultiheadAttention`` used as
batch-first self-attention (torchvision's ViT). Windowed attention (Swin) has no matrix over the
whole image and is refused, as are models without a class token to read the maps from.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.errors import UsageError
from camcli.hooks import Hooks
from camcli.methods.base import CamInputs, register

Recompute = Callable[[nn.Module, Tensor], "tuple[Tensor, Tensor]"]  # (module, x) -> (output, attention)


def _timm_attention(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm.layers.Attention.forward with the attention matrix explicit (no mask: ViT classifiers)."""
    b, n, _ = x.shape
    heads, head_dim = m.num_heads, m.head_dim
    gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
    q, k, v = m.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    attn = ((q * m.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (m.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, heads * head_dim)
    out = getattr(m, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return m.proj_drop(m.proj(out)), attn


def _multihead(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """torch.nn.MultiheadAttention(x, x, x), batch first, with the attention matrix explicit."""
    b, n, e = x.shape
    heads = m.num_heads
    q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, heads, e // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) / (e // heads) ** 0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, e)
    return m.out_proj(out), attn


def _recompute_for(m: nn.Module) -> Recompute | None:
    if type(m).__name__ == "Attention" and all(hasattr(m, a) for a in ("qkv", "num_heads", "head_dim", "scale", "proj")):
        return _timm_attention
    if isinstance(m, nn.MultiheadAttention) and m.batch_first and m._qkv_same_embed_dim and m.bias_k is None:
        return _multihead
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Recompute]]:
    """The global self-attention modules camcli can read, in module-tree order."""
    found = []
    for name, m in model.named_modules():
        fn = _recompute_for(m)
        if fn is not None:
            found.append((name, m, fn))
    return found


class AttentionTap(Hooks):
    """Recomputes each readable attention's output with its matrix explicit; ``maps`` holds the
    matrices (B, heads, N, N) in the order the blocks ran."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.maps: list[Tensor] = []
        super().__init__()

    def _register(self) -> None:
        for name, m, fn in attention_modules(self.model):
            self._handles.append(m.register_forward_hook(self._hook(name, fn), with_kwargs=True))

    def _hook(self, name: str, fn: Recompute):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(module, nn.MultiheadAttention):
                others = list(args[1:3]) + [kwargs.get(k) for k in ("key", "value") if k in kwargs]
                if any(o is not x for o in others):
                    raise UsageError(f"attention module {name!r} is not self-attention (key/value differ from the query)")
            elif kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or (len(args) > 1 and args[1] is not None):
                raise UsageError(f"attention module {name!r} runs with an attention mask, which camcli does not read")
            out, attn = fn(module, x)
            self.maps.append(attn)
            return (out, None) if isinstance(output, tuple) else out

        return hook


def _needs_attention(method: str) -> Callable[[nn.Module, Tensor], None]:
    def check(model: nn.Module, example: Tensor) -> None:
        if not attention_modules(model):
            raise UsageError(
                f"{method} reads the attention matrices of global self-attention blocks (timm's Attention, "
                "torch.nn.MultiheadAttention as in torchvision's ViT); this model has none camcli can read "
                "(windowed attention such as Swin's, or other attention classes). Use gradcam on this model"
            )

    return check


def _maps(tap: AttentionTap, method: str) -> list[Tensor]:
    if not tap.maps:
        raise UsageError(f"{method}: no attention module ran during the forward pass")
    return tap.maps


def _class_row(inputs: CamInputs, relevance: Tensor, method: str) -> Tensor:
    """The class token's row over the patch tokens, on the target layer's (h, w) grid."""
    h, w = inputs.activations.shape[-2:]
    prefix = relevance.shape[-1] - h * w
    if prefix < 1:
        raise UsageError(
            f"{method} reads the class token's row of the attention, and the {relevance.shape[-1]} tokens leave "
            f"none beside the {h}x{w} grid of the target layer; use it on models with a class token"
        )
    return relevance[:, 0, prefix:].reshape(-1, h, w)


def discard_lowest(attn: Tensor, ratio: float) -> Tensor:
    """Head-mean attention (B, N, N) with each image's floor(ratio * N^2) lowest entries set to 0, as
    vit-explain's ``discard_ratio``; as there, the class token's attention to itself (entry 0, 0) is
    never dropped, even when it is among the lowest. Ratio 0 (the paper's rollout) changes nothing."""
    b, n, _ = attn.shape
    count = int(n * n * ratio)
    if count == 0:
        return attn
    flat = attn.reshape(b, n * n)
    lowest = flat.topk(count, dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(b, n, n)


@register(
    "attention-rollout",
    aliases=("rollout", "attention_rollout"),
    needs_target=False,
    check=_needs_attention("attention-rollout"),
    extra_forwards="1",
    description="attention rolled out over the blocks (0.5 A + 0.5 I, head mean; --discard-ratio drops the "
    "lowest weights first): class token -> patches",
    paper="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers (arXiv:2005.00928)",
)
def attention_rollout(inputs: CamInputs) -> Tensor:
    x = inputs.inputs
    forward = inputs.forward
    with torch.inference_mode(), AttentionTap(inputs.model) as tap:
        forward(x)
    maps = _maps(tap, "attention-rollout")
    n = maps[0].shape[-1]
    eye = torch.eye(n, device=x.device)
    rolled = eye.expand(x.shape[0], n, n)
    for attn in maps:
        fused = discard_lowest(attn.float().mean(dim=1), inputs.options.discard_ratio)
        a = 0.5 * fused + 0.5 * eye  # the residual connection as identity
        rolled = (a / a.sum(dim=-1, keepdim=True)) @ rolled
    return _class_row(inputs, rolled, "attention-rollout").clone()


@register(
    "chefer",
    aliases=("gradient-attention", "transformer-attribution", "chefer2021"),
    check=_needs_attention("chefer"),
    needs_model=True,
    extra_forwards="1 (+ full backward)",
    description="relevance R += mean_heads((dy/dA * A)+) R over the blocks: class-specific attention",
    paper="Chefer et al. 2021, Generic Attention-model Explainability (arXiv:2103.15679)",
)
def chefer(inputs: CamInputs) -> Tensor:
    x = inputs.inputs
    score_fn = inputs.score_fn
    # Parameters are frozen: the input carries the graph through every block to the matrices.
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), AttentionTap(inputs.model) as tap:
        score = score_fn(xg).sum()  # the target's scalar (a class logit, a contrast, ...)
        maps = _maps(tap, "chefer")
        grads = torch.autograd.grad(score, maps)
    n = maps[0].shape[-1]
    relevance = torch.eye(n, device=x.device).expand(x.shape[0], n, n)
    for attn, g in zip(maps, grads):
        weighted = (g * attn).clamp(min=0).mean(dim=1).detach().float()
        relevance = relevance + weighted @ relevance
    return _class_row(inputs, relevance, "chefer")
