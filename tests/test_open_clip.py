"""open_clip models (issue 19, item 3): a tiny open_clip CLIP built here from a small config and saved
in open_clip's hub layout (no download), explained with --text: maps against Grad-CAM worked by plain
autograd, zero-shot probabilities against open_clip's own encode_image/encode_text, a module:function
returning an open_clip model, the batch_first=False layout, and the errors (no package, weights that
do not fit, a Hugging Face tokenizer)."""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import numpy as np
import open_clip  # in the dev extra: these tests run wherever the suite does
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from typer.testing import CliRunner

from camcli import targets as tgt
from camcli.cli import app
from camcli.errors import UsageError
from camcli.models import load_model
from camcli.options import ExplainOptions
from camcli.session import Session

runner = CliRunner()
SIDE, PATCH = 32, 8
GRID = SIDE // PATCH  # 4x4 patch tokens after the class token
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LAYER = "visual.transformer.resblocks.0"  # the last block's patch tokens never reach the pooled class token


def model_cfg() -> dict:
    vision = {"image_size": SIDE, "layers": 2, "width": 32, "head_width": 16, "patch_size": PATCH}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}


def tiny_clip(seed: int, batch_first: bool = True) -> nn.Module:
    """A tiny open_clip CLIP; ``batch_first=False``: its visual blocks run on (L, N, D) tokens, as
    open_clip's older models and those built with batch_first=False do."""
    torch.manual_seed(seed)
    cfg = model_cfg()
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))  # not open_clip's 1/0.07 default, so a wrong scale shows
    if not batch_first:
        transformer = model.visual.transformer
        transformer.batch_first = False
        for block in transformer.resblocks:
            block.attn.batch_first = False
    return model


def save_hub(folder: Path, model: nn.Module, safetensors: bool = True, cfg: dict | None = None) -> Path:
    """open_clip's hub layout: open_clip_config.json (model_cfg, preprocess_cfg) and the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg or model_cfg(), "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "size": SIDE}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        save_file(sd, str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return folder


def noise_batch(*seeds: int) -> Tensor:
    ims = [np.random.default_rng(s).integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8) for s in seeds]
    return torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im in ims])


def text_embeds(model: nn.Module, prompts: list[str]) -> Tensor:
    with torch.no_grad():
        return model.encode_text(open_clip.tokenizer.SimpleTokenizer()(prompts))


def hand_gradcam(model: nn.Module, x: Tensor, prompt: str) -> tuple[np.ndarray, float]:
    """Grad-CAM by plain autograd at LAYER's output: s = logit_scale.exp() * cos(image, text), weights
    = the patch tokens' mean gradient per channel, map = ReLU(sum_c w_c A_c), min-max scaled. Tokens
    (1, 1 + 16, C) (batch first) or (1 + 16, 1, C) (batch_first=False) -> (C, 4, 4), class token dropped."""
    layer = model.get_submodule(LAYER)
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        image = model.encode_image(x)
    finally:
        handle.remove()
    score = model.logit_scale.exp() * F.cosine_similarity(image, text_embeds(model, [prompt]), dim=1)
    (grad,) = torch.autograd.grad(score.sum(), seen[0])
    act = seen[0].detach()
    if act.shape[0] != 1:  # (L, N, D)
        act, grad = act.transpose(0, 1), grad.transpose(0, 1)

    def grid(t: Tensor) -> Tensor:
        return t[0, 1:].reshape(GRID, GRID, t.shape[-1]).permute(2, 0, 1).double()

    a, g = grid(act), grid(grad)
    cam = torch.relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(dim=0))
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return cam.numpy(), float(score.detach())


# -- (a) one prompt: Grad-CAM against plain autograd --------------------------------------------------
@pytest.mark.parametrize("source", ["folder", "callable with (L, N, D) blocks"])
def test_one_prompt_gradcam_equals_the_hand_worked_map(tmp_path: Path, monkeypatch, source: str) -> None:
    model = tiny_clip(seed=3)
    if source == "folder":
        name = str(save_hub(tmp_path / "oc", model))
    else:  # the same weights, blocks not batch first: camcli makes them so (the arithmetic is the same)
        builder = type(sys)("oc_lnd")
        builder.build = lambda: tiny_clip(seed=3, batch_first=False)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "oc_lnd", builder)
        name = "oc_lnd:build"
    s = Session.open(ExplainOptions(model=name, text=("a red square",), layer=(LAYER,), device="cpu", quiet=True))
    assert s.model.input_size == SIDE
    if source == "folder":
        assert s.model.source == "open_clip" and s.model.mean == MEAN and s.model.std == STD  # preprocess_cfg
    assert s.specs == [tgt.Text("a red square")] and s.activation.value == "none"
    batch = noise_batch(1, 2)
    outs = s.explain_images(batch)
    x = s.preprocess.normalize(batch.clone())
    scores = []
    for i, out in enumerate(outs):
        (m,) = out.maps
        want, score = hand_gradcam(model, x[i : i + 1], "a red square")
        assert m.explained == {"kind": "text", "prompt": "a red square"}
        assert m.score == pytest.approx(score, abs=1e-5)
        assert 0 < want.mean() < 1  # not a trivial map
        np.testing.assert_allclose(m.cam, want, atol=1e-5)
        scores.append(score)
    assert scores[0] != pytest.approx(scores[1])


def test_hand_gradcam_reads_l_n_d_blocks_as_batch_first_ones() -> None:
    """The test's own reshape of (L, N, D) tokens gives the batch-first map (the reference is sound)."""
    x = torch.randn(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    first, other = hand_gradcam(tiny_clip(seed=3), x, "red"), hand_gradcam(tiny_clip(seed=3, batch_first=False), x, "red")
    np.testing.assert_allclose(first[0], other[0], atol=1e-6)
    assert first[1] == pytest.approx(other[1], abs=1e-6)


def test_layers_are_the_visual_towers_and_the_default_is_a_vit_block(tmp_path: Path) -> None:
    folder = save_hub(tmp_path / "oc", tiny_clip(seed=1))
    s = Session.open(ExplainOptions(model=str(folder), text=("red",), device="cpu", quiet=True))
    assert s.layers[0].startswith("visual.transformer.resblocks.1")
    names = [n for n, _ in s.model.module.named_modules()]
    assert LAYER in names and not any(n.startswith(("transformer.", "token_embedding")) for n in names)


# -- (b) several prompts: open_clip's own zero-shot probabilities --------------------------------------
@pytest.mark.parametrize("safetensors", [True, False])
def test_several_prompts_have_open_clips_own_probabilities(tmp_path: Path, safetensors: bool) -> None:
    model = tiny_clip(seed=4)
    folder = save_hub(tmp_path / "oc", model, safetensors=safetensors)
    prompts = ["red", "blue", "a green square"]
    s = Session.open(ExplainOptions(model=str(folder), text=tuple(prompts), classes=("top1", "a green square"),
                                    device="cpu", quiet=True))
    assert s.model.labels == prompts and s.model.num_classes == 3 and s.activation.value == "softmax"
    assert s.specs == [tgt.TopK(1), tgt.ClassIndex(2)]
    batch = noise_batch(5, 6)
    outs = s.explain_images(batch)
    with torch.no_grad():
        img = F.normalize(model.encode_image(s.preprocess.normalize(batch.clone())), dim=-1)
        txt = F.normalize(text_embeds(model, prompts), dim=-1)
        probs = (model.logit_scale.exp() * img @ txt.T).softmax(dim=-1)
    for i, out in enumerate(outs):
        got = dict(out.top)
        for j in range(3):
            assert got[j] == pytest.approx(float(probs[i, j]), abs=1e-5)
        assert out.maps[0].target == int(probs[i].argmax()) and out.maps[1].target == 2


@pytest.mark.parametrize("tower", ["ModifiedResNet", "timm ViT"])
def test_resnet_and_timm_towers_explain_their_own_layers(tmp_path: Path, tower: str) -> None:
    """Other visual towers: ModifiedResNet (a CNN: visual.layer4, nchw) and a timm trunk (its own
    ViT hints: visual.trunk.blocks.N, class token first); probabilities are still open_clip's own."""
    cfg = model_cfg()
    if tower == "ModifiedResNet":
        side, layer, grid = 64, "visual.layer4", (2, 2)
        cfg["vision_cfg"] = {"image_size": side, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16}
    else:  # timm builds its trunk at its own size (open_clip does not pass image_size to it)
        side, layer, grid = 224, "visual.trunk.blocks.11.norm1", (14, 14)
        cfg["vision_cfg"] = {"timm_model_name": "vit_tiny_patch16_224", "image_size": side, "timm_pool": "",
                             "timm_proj": "linear"}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    folder = save_hub(tmp_path / "oc", model, cfg=cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    s = Session.open(ExplainOptions(model=str(folder), text=("red", "blue"), device="cpu", quiet=True))
    assert s.layers == [layer] and s.model.input_size == side
    assert s.model.mean == open_clip.OPENAI_DATASET_MEAN  # no preprocess_cfg: OpenAI's
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, side, side)).astype(np.uint8))
    (out,) = s.explain_images(batch)
    assert out.maps[0].cam.shape == grid
    with torch.no_grad():
        img = F.normalize(model.encode_image(s.preprocess.normalize(batch.clone())), dim=-1)
        probs = (model.logit_scale.exp() * img @ F.normalize(text_embeds(model, ["red", "blue"]), dim=-1).T).softmax(-1)
    got = dict(out.top)
    assert [got[0], got[1]] == pytest.approx(probs[0].tolist(), abs=1e-5)


def test_module_function_returning_an_open_clip_model_is_wrapped(tmp_path: Path, monkeypatch) -> None:
    model = tiny_clip(seed=5)
    module = type(sys)("oc_builder")
    module.build = lambda: model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "oc_builder", module)
    lm = load_model("oc_builder:build", device="cpu")
    assert type(lm.module).__name__ == "OpenClipImage" and lm.input_size == SIDE
    assert lm.mean == open_clip.OPENAI_DATASET_MEAN and lm.std == open_clip.OPENAI_DATASET_STD
    lm.module.set_prompts(["red", "blue"])
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        want = model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ F.normalize(
            text_embeds(model, ["red", "blue"]), dim=-1).T
        torch.testing.assert_close(lm.module(x), want, atol=1e-5, rtol=1e-5)


# -- (c), (d) errors -------------------------------------------------------------------------------------
def test_without_open_clip_the_error_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    folder = save_hub(tmp_path / "oc", tiny_clip(seed=1))
    real_import = builtins.__import__

    def no_open_clip(name: str, *args, **kwargs):  # noqa: ANN002, ANN003
        if name == "open_clip" or name.startswith("open_clip."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "open_clip")
    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(UsageError) as e:
        load_model(str(folder), device="cpu")
    message = str(e.value)
    assert "\n" not in message and "pip install 'camcli[openclip]'" in message and str(folder) in message
    image = tmp_path / "im.png"
    from PIL import Image

    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(image)
    r = runner.invoke(app, ["explain", str(image), "--model", str(folder), "--text", "red", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "camcli[openclip]" in r.output


def test_weights_that_do_not_fit_exit_2_naming_the_key(tmp_path: Path) -> None:
    model = tiny_clip(seed=1)
    folder = save_hub(tmp_path / "oc", model)
    wider = model_cfg()
    wider["embed_dim"] = 24  # the file's projections are 16 wide
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": wider, "preprocess_cfg": {}}))
    image = tmp_path / "im.png"
    from PIL import Image

    Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(image)
    r = runner.invoke(app, ["explain", str(image), "--model", str(folder), "--text", "red", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "shape mismatch" in r.output and "text_projection" in r.output
    assert "--model" in r.output and "--weights" not in r.output  # the user gave no --weights
    # a missing key is named too
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "visual.proj"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(), "preprocess_cfg": {}}))
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(UsageError, match=r"missing keys \(first: visual.proj\)"):
        load_model(str(folder), device="cpu")


def test_a_hugging_face_tokenizer_or_no_weights_is_a_clear_error(tmp_path: Path) -> None:
    cfg = model_cfg()
    cfg["text_cfg"]["hf_tokenizer_name"] = "some/tokenizer"
    folder = save_hub(tmp_path / "oc", tiny_clip(seed=1), cfg=cfg)
    with pytest.raises(UsageError, match="download") as e:
        load_model(str(folder), device="cpu")
    assert "some/tokenizer" in str(e.value)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(UsageError, match="open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        load_model(str(folder), device="cpu")
