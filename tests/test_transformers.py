"""Transformers end to end: default layers, maps that land on the object, agreement with
pytorch-grad-cam through hand-written reshapes, Hugging Face folders, input sizes, refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import toymodels
from camcli.engine import CamEngine, EngineConfig
from camcli.errors import ModelError, UsageError
from camcli.layers import choose_layers, default_layer, trace_layers
from camcli.methods import CamInputs, MethodOptions, available_methods, get_method
from camcli.models import load_model
from camcli.sanity import pearson
from camcli.targets import ClassIndex

# -- a ViT trained in the test: a coloured square on noise beside a grey one ----------------------
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])  # classes 0-2; class 3: none
SIDE, CELL = 32, 8  # 4x4 grid of 8-pixel cells, one token per cell


def squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised images, labels, and the grid cell of the coloured square (class 3: grey only)."""
    gen = torch.Generator().manual_seed(seed)
    g = SIDE // CELL
    x = (0.5 + 0.15 * torch.randn(n, 3, SIDE, SIDE, generator=gen)).clamp(0, 1)
    y = torch.randint(0, 4, (n,), generator=gen)
    cells = torch.rand(n, g * g, generator=gen).argsort(dim=1)[:, :2]  # two different cells
    fill = torch.where((y < 3)[:, None], COLOURS[y.clamp(max=2)], torch.full((n, 3), 0.5))

    def mask(c: torch.Tensor) -> torch.Tensor:
        return F.interpolate(F.one_hot(c, g * g).float().reshape(n, 1, g, g), scale_factor=CELL, mode="nearest")

    coloured, grey = mask(cells[:, 0]), mask(cells[:, 1])
    x = x * (1 - coloured - grey) + coloured * fill[:, :, None, None] + grey * 0.5
    return (x - 0.5) / 0.25, y, cells[:, 0]


def train_square_vit(reg_tokens: int) -> nn.Module:
    """A tiny timm ViT, 40 Adam steps on batches of 48. One-vs-rest (sigmoid) targets: each class logit must rise with
    its own evidence; with softmax, a class can be told by the others going down, and its gradient
    then points at no square in particular."""
    model = toymodels.tiny_vit(reg_tokens=reg_tokens)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(40):
        x, y, _ = squares(48, seed=step)
        loss = F.binary_cross_entropy_with_logits(model(x), F.one_hot(y, 4).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_gradcam_on_a_trained_vit_lands_on_the_class_square(reg_tokens: int) -> None:
    model = train_square_vit(reg_tokens)
    x, y, cell = squares(160, seed=1000)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9  # it learned the task
    layers = choose_layers(model, None, "vit", x[:1])
    assert layers == ["blocks.1.norm1"]  # the first norm of the last block
    engine = CamEngine(model, EngineConfig(layers, [get_method("gradcam"), get_method("chefer")]))
    engine.check(x[:1])
    for c in range(3):
        idx = (y == c).nonzero().flatten()[:16]
        outs = engine.maps(x[idx], [ClassIndex(c)])
        for k, method in enumerate(("gradcam", "chefer")):
            assert outs[0].maps[k].method == method and outs[0].maps[k].cam.shape == (4, 4)
            hits = [int(np.argmax(o.maps[k].cam)) == int(cell[i]) for o, i in zip(outs, idx)]
            assert sum(hits) >= 0.8 * len(hits), f"{method}, class {c}: peaks on its square in {sum(hits)}/{len(hits)}"


def test_last_block_output_gives_patch_tokens_no_gradient() -> None:
    # Why the default is not the last layer: the head reads the class token only, so every patch
    # token of the final norm has a zero gradient and Grad-CAM there is empty.
    model = toymodels.tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    out = CamEngine(model, EngineConfig(["norm"], [get_method("gradcam")])).maps(x, [ClassIndex(0)])[0].maps[0]
    assert out.empty and not out.cam.any()


# -- agreement with pytorch-grad-cam, the reshape written by hand --------------------------------
def agreement(
    model: nn.Module, layer: str, x: torch.Tensor, reshape: Callable[[torch.Tensor], torch.Tensor],
    theirs: nn.Module | None = None,
) -> float:
    """Pearson r of camcli's Grad-CAM (upsampled) and pytorch-grad-cam's on ``theirs`` (default: the
    same model; a wrapper returning plain logits for Hugging Face models), at ``layer`` of ``model``."""
    engine = CamEngine(model, EngineConfig([layer], [get_method("gradcam")]))
    engine.check(x)
    target = engine.maps(x, [ClassIndex(0)])[0].top[0][0]
    mine = engine.maps(x, [ClassIndex(target)])[0].maps[0]
    assert not mine.empty
    with pgc.GradCAM(model=theirs or model, target_layers=[model.get_submodule(layer)], reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    up = F.interpolate(torch.from_numpy(mine.cam)[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    return pearson(up[0, 0].numpy(), theirs)


def test_timm_swin_agrees_with_pytorch_grad_cam() -> None:
    model = toymodels.dynamic_swin().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    infos = trace_layers(model, x)
    assert default_layer(infos) == "norm"  # the final norm after the last stage
    assert next(i.layout_text for i in infos if i.name == "norm") == "nhwc 7x7"
    assert agreement(model, "norm", x, lambda t: t.permute(0, 3, 1, 2)) > 0.98


def test_torchvision_vit_agrees_with_pytorch_grad_cam() -> None:
    model = toymodels.tv_vit().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layer = default_layer(trace_layers(model, x))
    assert layer == "encoder.layers.encoder_layer_1.ln_1"

    def reshape(t: torch.Tensor) -> torch.Tensor:  # class token first, then an 8x8 grid
        return t[:, 1:].reshape(t.shape[0], 8, 8, t.shape[2]).permute(0, 3, 1, 2)

    assert agreement(model, layer, x, reshape) > 0.98


# -- Hugging Face folders -------------------------------------------------------------------------
class Logits(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(x).logits


def test_hugging_face_vit_folder_loads_offline_and_agrees(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=48, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, id2label={0: "cat", 1: "dog", 2: "cow"}, label2id={"cat": 0, "dog": 1, "cow": 2},
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3],
                                   image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert (lm.source, lm.labels, lm.num_classes) == ("huggingface", ["cat", "dog", "cow"], 3)
    assert (lm.mean, lm.std, lm.input_size, lm.flexible_size) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 48, False)
    assert lm.weights_sha256 is not None and len(lm.weights_sha256) == 64
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    layer = default_layer(trace_layers(lm.module, x))
    assert layer.endswith("layers.1.layernorm_before") or layer.endswith("layer.1.layernorm_before")

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 1:].reshape(t.shape[0], 6, 6, t.shape[2]).permute(0, 3, 1, 2)

    assert agreement(lm.module, layer, x, reshape, theirs=Logits(lm.module).eval()) > 0.98
    # the engine reads `logits` from the model's own output object
    out = CamEngine(lm.module, EngineConfig([layer], [get_method("gradcam")])).maps(x, [ClassIndex(1)])[0]
    assert out.maps[0].cam.shape == (6, 6) and len(out.top) == 3


def test_hugging_face_folder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="folder without config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTForImageClassification"]}')
    with pytest.raises(ModelError, match="not a loadable Hugging Face image classifier folder"):
        load_model(str(tmp_path))  # no weights: fails locally, never asks the network
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ModelError, match=r"pip install camcli\[hf\]"):
        load_model(str(tmp_path))


# -- input sizes and preprocessing ------------------------------------------------------------------
def test_flexible_transformers_get_inputs_in_whole_patches() -> None:
    vit = load_model("toymodels:dynamic_vit")
    assert (vit.flexible_size, vit.size_multiple, vit.input_size) == (True, 16, 224)
    assert vit.mean == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg, not ImageNet's defaults
    pre = vit.preprocess()
    assert pre.input_hw(480, 722) == (224, 336)  # 337.0 would not divide into 16-pixel patches
    x = torch.randn(1, 3, *pre.input_hw(480, 722))
    layer = choose_layers(vit.module, None, vit.name, x)
    out = CamEngine(vit.module, EngineConfig(layer, [get_method("gradcam")])).maps(x, [ClassIndex(0)])[0]
    assert layer == ["blocks.0.norm1"] and out.maps[0].cam.shape == (14, 21)  # 2 register tokens dropped
    swin = load_model("toymodels:dynamic_swin")
    assert (swin.flexible_size, swin.size_multiple) == (True, 32)
    assert swin.preprocess().input_hw(480, 722) == (224, 352)


def test_fixed_size_transformers_get_their_own_size() -> None:
    tv = load_model("toymodels:tv_vit")  # torchvision: image_size attribute
    assert (tv.flexible_size, tv.input_size, tv.preprocess().input_hw(480, 722)) == (False, 64, (64, 64))
    timm_vit = load_model("toymodels:tiny_vit")  # timm: patch_embed.img_size, not the 224 of pretrained_cfg
    assert (timm_vit.flexible_size, timm_vit.input_size, timm_vit.size_multiple) == (False, 32, 8)


def test_mean_std_overrides_and_their_errors() -> None:
    lm = load_model("toymodels:tiny_cnn", mean="0.1, 0.2, 0.3", std=[1, 2, 3])
    assert (lm.mean, lm.std) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with pytest.raises(UsageError, match=r"--mean '0.5,0.5': expected three numbers"):
        load_model("toymodels:tiny_cnn", mean="0.5,0.5")
    with pytest.raises(UsageError, match=r"--std '1,0,1': every value must be greater than 0"):
        load_model("toymodels:tiny_cnn", std="1,0,1")


# -- every method on a token layer: a map, or a reason ---------------------------------------------
REFUSED = {"cam": "global-average-pool -> linear", "guided-backprop": "needs ReLU", "guided-gradcam": "needs ReLU",
           "shapleycam": "second derivatives"}  # shapleycam: the fused CPU attention has no double backward


@pytest.mark.parametrize("name", [m.name for m in available_methods()])
def test_every_method_works_on_a_token_layer_or_says_why(name: str) -> None:
    model = toymodels.tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    few = MethodOptions(samples=2, rise_masks=32)  # noise samples / steps: 2 are enough here; RISE masks: 32
    engine = CamEngine(model, EngineConfig(["blocks.1.norm1"], [get_method(name)], options=few))
    if name in REFUSED:
        with pytest.raises(UsageError, match=REFUSED[name]):
            engine.check(x[:1])
        return
    engine.check(x[:1])
    maps = [o.maps[0] for o in engine.maps(x, [ClassIndex(1)])]
    shape = (32, 32) if get_method(name).pixel_space else (4, 4)  # pixel-space methods: the input's size
    assert all(m.cam.shape == shape and np.isfinite(m.cam).all() for m in maps)
    assert any(not m.empty for m in maps)


# -- attention methods: timm's fused attention read back as explicit matrices ----------------------
def explicit_attention(model: nn.Module, x: torch.Tensor, target: int) -> tuple[list, list]:
    """Attention matrices and their gradients from timm's own unfused code path (fused_attn=False),
    caught where it applies attention dropout to the softmax output."""
    for block in model.blocks:
        block.attn.fused_attn = False
    caught: list[torch.Tensor] = []

    def grab(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        caught.append(out)

    hooks = [b.attn.attn_drop.register_forward_hook(grab) for b in model.blocks]
    try:
        model(x.clone().requires_grad_(True))[:, target].sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return [a.detach() for a in caught], [a.grad for a in caught]


def test_attention_methods_match_explicit_attention_by_hand() -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    attn, grads = explicit_attention(toymodels.tiny_vit().eval(), x, target=1)
    assert len(attn) == 2 and attn[0].shape == (2, 2, 17, 17)  # blocks x (B, heads, 1 + 16, 1 + 16)
    eye = torch.eye(17)
    rolled, relevance = eye.expand(2, 17, 17), eye.expand(2, 17, 17)
    for a, g in zip(attn, grads):
        half = 0.5 * a.mean(dim=1) + 0.5 * eye
        rolled = (half / half.sum(dim=-1, keepdim=True)) @ rolled
        relevance = relevance + (g * a).clamp(min=0).mean(dim=1) @ relevance
    fused = toymodels.tiny_vit().eval()  # same weights; timm's default fused kernel
    assert fused.blocks[0].attn.fused_attn
    for name, expected in (("attention-rollout", rolled), ("chefer", relevance)):
        got = get_method(name).fn(
            CamInputs(activations=torch.zeros(2, 1, 4, 4), targets=torch.tensor([1, 1]), inputs=x, model=fused,
                      forward=fused, score_fn=lambda t: fused(t)[:, 1])
        )
        assert torch.allclose(got, expected[:, 0, 1:].reshape(2, 4, 4), atol=1e-6), name


def test_attention_methods_on_torchvision_and_their_refusals() -> None:
    model = toymodels.tv_vit().eval()  # nn.MultiheadAttention inside
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    engine = CamEngine(model, EngineConfig(["encoder.layers.encoder_layer_1.ln_1"], [get_method("rollout"), get_method("chefer")]))
    engine.check(x)
    with torch.no_grad():
        before = model(x)
    maps = engine.maps(x, [ClassIndex(2)])[0].maps
    assert [m.method for m in maps] == ["attention-rollout", "chefer"]
    assert all(m.cam.shape == (8, 8) and not m.empty for m in maps)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the hooks are gone
    swin = toymodels.dynamic_swin().eval()  # windowed attention: no matrix over the whole image
    with pytest.raises(UsageError, match="chefer reads the attention matrices.*Use gradcam"):
        CamEngine(swin, EngineConfig(["norm"], [get_method("chefer")])).check(torch.randn(1, 3, 224, 224))
    gap = toymodels.tiny_vit(class_token=False, global_pool="avg").eval()
    with pytest.raises(UsageError, match="reads the class token's row"):
        CamEngine(gap, EngineConfig(["blocks.1.norm1"], [get_method("rollout")])).maps(torch.randn(1, 3, 32, 32), [ClassIndex(0)])
