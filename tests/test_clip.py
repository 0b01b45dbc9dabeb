"""--text on CLIP-style models (issue 19, items 2-4): Hugging Face CLIPModel folders built here (tiny
configs, a letter tokenizer, no download), maps against Grad-CAM worked by plain autograd and against
pytorch-grad-cam's CLIP example, zero-shot probabilities against CLIPModel's own, a tiny CLIP trained
here on a red square and a blue circle, records, fingerprint and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from typer.testing import CliRunner

import toymodels
from camcli import targets as tgt
from camcli.cli import app
from camcli.errors import UsageError
from camcli.models import load_model
from camcli.models.load import IMAGENET_MEAN, IMAGENET_STD
from camcli.options import ExplainOptions
from camcli.pipeline import run_explain
from camcli.records import load_run
from camcli.sanity import pearson
from camcli.session import Session

runner = CliRunner()
SIDE, PATCH = 32, 8
GRID = SIDE // PATCH  # 4x4 patch tokens after the class token


def save_clip(folder: Path, model: nn.Module, tokenizer: bool = True) -> Path:
    """A save_pretrained folder, as a user's would be: config.json, model.safetensors, the tokenizer."""
    model.save_pretrained(folder)
    if tokenizer:
        toymodels.char_tokenizer().save_pretrained(folder)
    return folder


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)
    return path


def noise_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)


def uint8_batch(*images: np.ndarray) -> Tensor:
    return torch.stack([torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1) for im in images])


def text_inputs(prompts: list[str]) -> dict[str, Tensor]:
    tokens = toymodels.char_tokenizer()(prompts, padding=True, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def tokens_to_grid(t: Tensor) -> Tensor:
    """(B, 1 + 16, C) tokens -> (B, C, 4, 4): the class token dropped, the patches row by row."""
    return t[:, 1:].reshape(t.shape[0], GRID, GRID, t.shape[-1]).permute(0, 3, 1, 2)


def hand_gradcam(clip: nn.Module, x: Tensor, prompt: str) -> tuple[np.ndarray, float]:
    """Grad-CAM by plain autograd at the last block's layer_norm1: s = logit_scale * cos(image, text),
    weights = the patch tokens' mean gradient per channel, map = ReLU(sum_c w_c A_c), min-max scaled."""
    layer = clip.vision_model.encoder.layers[-1].layer_norm1
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        image = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
    finally:
        handle.remove()
    with torch.no_grad():
        text = clip.text_projection(clip.text_model(**text_inputs([prompt])).pooler_output)
    score = clip.logit_scale.exp() * F.cosine_similarity(image, text, dim=1)
    (grad,) = torch.autograd.grad(score.sum(), seen[0])
    a, g = tokens_to_grid(seen[0].detach())[0].double(), tokens_to_grid(grad)[0].double()
    cam = torch.relu((g.mean(dim=(1, 2))[:, None, None] * a).sum(dim=0))
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return cam.numpy(), float(score.detach())


# -- (a) against values worked out by hand ------------------------------------------------------------
def test_one_prompt_gradcam_equals_the_hand_worked_map_and_records_say_text(tmp_path: Path) -> None:
    clip = toymodels.clip_model(seed=3)
    folder = save_clip(tmp_path / "clip", clip)
    s = Session.open(ExplainOptions(model=str(folder), text=("red",), device="cpu", quiet=True))
    assert s.layers == ["vision_model.encoder.layers.1.layer_norm1"]  # a ViT's default: the last block's first norm
    assert s.specs == [tgt.Text("red")] and s.activation.value == "none" and s.value_key == "value"
    batch = uint8_batch(noise_image(1), noise_image(2))
    (out0, out1) = s.explain_images(batch)
    x = s.preprocess.normalize(batch.clone())
    for out, xi in ((out0, x[:1]), (out1, x[1:])):
        (m,) = out.maps
        want, score = hand_gradcam(clip, xi, "red")
        assert m.explained == {"kind": "text", "prompt": "red"} and m.target is None
        assert m.score == pytest.approx(score, abs=1e-5)
        assert 0 < want.mean() < 1  # not a trivial map
        np.testing.assert_allclose(m.cam, want, atol=1e-5)
    assert out0.maps[0].score != pytest.approx(out1.maps[0].score)


def test_several_prompts_are_zero_shot_classes_with_clips_own_probabilities(tmp_path: Path) -> None:
    clip = toymodels.clip_model(seed=4)
    folder = save_clip(tmp_path / "clip", clip)
    prompts = ["red", "blue", "green square"]
    s = Session.open(ExplainOptions(model=str(folder), text=tuple(prompts), classes=("top1", "green square"),
                                    device="cpu", quiet=True))
    assert s.model.labels == prompts and s.model.num_classes == 3 and s.activation.value == "softmax"
    assert s.specs == [tgt.TopK(1), tgt.ClassIndex(2)]
    batch = uint8_batch(noise_image(5), noise_image(6))
    outs = s.explain_images(batch)
    with torch.no_grad():
        theirs = clip(pixel_values=s.preprocess.normalize(batch.clone()), **text_inputs(prompts))
    probs = theirs.logits_per_image.softmax(-1)
    for i, out in enumerate(outs):
        got = dict(out.top)
        assert sorted(got) == [0, 1, 2]
        np.testing.assert_allclose([got[j] for j in range(3)], probs[i].numpy(), atol=1e-5)
        first = out.maps[0]
        assert first.target == int(probs[i].argmax())
        assert first.score == pytest.approx(float(theirs.logits_per_image[i, first.target]), abs=1e-4)
        assert out.maps[-1].target == 2  # the prompt named as a label


def test_several_prompts_records_say_text_and_the_prompt(tmp_path: Path) -> None:
    folder = save_clip(tmp_path / "clip", toymodels.clip_model(seed=4))
    (tmp_path / "in").mkdir()
    save_rgb(tmp_path / "in" / "a.png", noise_image(5))
    res = run_explain([tmp_path / "in"], ExplainOptions(model=str(folder), text=("red", "blue"), classes=("blue",),
                                                         out=str(tmp_path / "out"), workers=0, quiet=True))
    assert res.exit_code == 0
    (rec,) = load_run(tmp_path / "out")["images"]
    target = rec["explanations"][0]["target"]
    assert target["kind"] == "text" and target["prompt"] == "blue" and target["index"] == 1
    assert 0 < target["probability"] < 1


# -- (b) against pytorch-grad-cam's CLIP example --------------------------------------------------------
class ImageLogits(nn.Module):
    """pytorch-grad-cam's CLIP example (usage_examples/clip_example.py): the model's output is
    logits_per_image for fixed text inputs, so ClassifierOutputTarget(j) is prompt j's logit."""

    def __init__(self, clip: nn.Module, prompts: list[str]) -> None:
        super().__init__()
        self.clip, self.text = clip, text_inputs(prompts)

    def forward(self, x: Tensor) -> Tensor:
        return self.clip(pixel_values=x, **self.text).logits_per_image


def test_prompt_maps_agree_with_pytorch_grad_cam_clip_example(tmp_path: Path) -> None:
    """Deviation: pytorch-grad-cam scales its map before resizing it with cv2 to the input (32x32);
    camcli's map is at the token grid (4x4), upsampled bilinearly here, so agreement is by Pearson."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clip = toymodels.clip_model(seed=7)
    folder = save_clip(tmp_path / "clip", clip)
    prompts = ["red", "blue"]
    s = Session.open(ExplainOptions(model=str(folder), text=tuple(prompts), classes=("0", "1"), device="cpu",
                                    quiet=True))
    batch = uint8_batch(noise_image(8))
    out = s.explain_images(batch)[0]
    x = s.preprocess.normalize(batch.clone())
    wrapped = ImageLogits(clip, prompts).eval()

    def reshape(t: Tensor) -> Tensor:  # the example's reshape_transform: drop the class token, tokens to a grid
        return tokens_to_grid(t)

    layer = clip.vision_model.encoder.layers[-1].layer_norm1
    for j in (0, 1):
        with pgc.GradCAM(model=wrapped, target_layers=[layer], reshape_transform=reshape) as cam:
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(j)])[0]
        (ours,) = [m for m in out.maps if m.target == j]
        up = F.interpolate(torch.from_numpy(ours.cam)[None, None], size=(SIDE, SIDE), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        assert theirs.shape == (SIDE, SIDE) and theirs.std() > 0
        assert pearson(up, theirs) > 0.99


# -- (c) class-discriminative: a tiny CLIP trained here ------------------------------------------------
RED, BLUE = (230, 25, 25), (25, 25, 230)


def shapes_image(rng: np.random.Generator, square: tuple[int, int] | None, circle: tuple[int, int] | None) -> np.ndarray:
    """Grey noise with a red square and/or a blue disc, each inside one 8x8 patch (row, column)."""
    img = rng.integers(100, 156, (SIDE, SIDE, 3)).astype(np.uint8)
    if square is not None:
        r, c = square
        img[r * PATCH + 1 : r * PATCH + 7, c * PATCH + 1 : c * PATCH + 7] = RED
    if circle is not None:
        r, c = circle
        yy, xx = np.mgrid[0:SIDE, 0:SIDE]
        inside = (yy - (r * PATCH + 3.5)) ** 2 + (xx - (c * PATCH + 3.5)) ** 2 <= 3.2**2
        img[inside] = BLUE
    return img


def train_red_blue_clip() -> nn.Module:
    """A one-block CLIPModel trained on images holding a red square, a blue circle, both or neither, each
    prompt's logit (logit_scale * cos) against whether its shape is there: a sigmoid loss per caption, as
    SigLIP's. Not CLIP's softmax over the two captions: trained so on single-shape images, the model may
    read "red" as "no blue", and the "red" map then marks the circle (negatively), a true explanation of
    that model but no test of which region a prompt picks. One block: the class token reads the patches
    once, at the default layer (the block's first norm), so the patch tokens there hold the shapes."""
    clip = toymodels.clip_model(seed=11, layers=1).train()
    rng = np.random.default_rng(0)
    images, present = [], []
    for _ in range(512):
        has = rng.integers(0, 2, 2)
        cells = rng.permutation(GRID * GRID)[:2]
        square = divmod(int(cells[0]), GRID) if has[0] else None
        circle = divmod(int(cells[1]), GRID) if has[1] else None
        images.append(shapes_image(rng, square, circle))
        present.append(has)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (uint8_batch(*images).float() / 255 - mean) / std  # camcli's preprocessing of the saved folder
    y = torch.tensor(np.array(present), dtype=torch.float32)
    text = text_inputs(["red", "blue"])
    opt = torch.optim.Adam(clip.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(120):
        rows = torch.randint(0, len(x), (32,))
        loss = F.binary_cross_entropy_with_logits(clip(pixel_values=x[rows], **text).logits_per_image, y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return clip.eval()


def test_prompt_red_peaks_on_the_square_and_blue_on_the_circle(tmp_path: Path) -> None:
    folder = save_clip(tmp_path / "clip", train_red_blue_clip())
    rng = np.random.default_rng(1)
    layouts = [((0, 1), (2, 3)), ((3, 0), (1, 2)), ((1, 1), (1, 3)), ((2, 2), (0, 0)), ((3, 3), (3, 1))]
    batch = uint8_batch(*[shapes_image(rng, square, circle) for square, circle in layouts])
    peaks: dict[str, list[tuple[int, ...]]] = {}
    for prompt in ("red", "blue"):
        s = Session.open(ExplainOptions(model=str(folder), text=(prompt,), device="cpu", quiet=True))
        assert s.layers == ["vision_model.encoder.layers.0.layer_norm1"]
        outs = s.explain_images(batch.clone())
        peaks[prompt] = [tuple(int(v) for v in np.unravel_index(o.maps[0].cam.argmax(), o.maps[0].cam.shape))
                         for o in outs]
    assert peaks["red"] == [square for square, _ in layouts]
    assert peaks["blue"] == [circle for _, circle in layouts]
    # Zero-shot over both prompts: a single-shape image is classified by its caption.
    s = Session.open(ExplainOptions(model=str(folder), text=("red", "blue"), device="cpu", quiet=True))
    single = uint8_batch(shapes_image(rng, (2, 2), None), shapes_image(rng, None, (0, 3)))
    assert [o.top[0][0] for o in s.explain_images(single)] == [0, 1]


# -- (d) records, fingerprint, text encoded once, errors ------------------------------------------------
def test_text_is_encoded_once_per_run_not_per_image(tmp_path: Path) -> None:
    lm = load_model("toymodels:tiny_clip")
    text_model = lm.module._text[0]
    calls = [0]
    text_model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    images = [save_rgb(tmp_path / f"img{i}.png", noise_image(i)) for i in range(5)]
    res = run_explain([str(p) for p in images], ExplainOptions(text=("red", "blue"), batch_size=2, workers=0,
                                                                out=str(tmp_path / "o"), quiet=True), model=lm)
    assert len(res.images) == 5 and all(r["status"] == "ok" for r in res.images)
    assert calls[0] == 1  # three batches, one encoding of both prompts


def test_records_summary_and_fingerprint_say_what_was_explained(tmp_path: Path) -> None:
    folder = save_clip(tmp_path / "clip", toymodels.clip_model(seed=2))
    image = save_rgb(tmp_path / "img.png", noise_image(3))
    base = ["explain", str(image), "--model", str(folder), "--device", "cpu", "-q"]
    r = runner.invoke(app, [*base, "--text", "a red thing, small", "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["options"]["text"] == ["a red thing, small"]  # a comma stays inside the prompt
    assert summary["options"]["activation"] == "none" and summary["options"]["class"] is None
    (entry,) = json.loads((tmp_path / "one" / "records.jsonl").read_text().splitlines()[1])["explanations"]
    assert entry["target"]["kind"] == "text" and entry["target"]["prompt"] == "a red thing, small"
    assert isinstance(entry["target"]["value"], float)

    r = runner.invoke(app, [*base, "--text", "red", "--text", "blue", "--class", "blue", "--out", str(tmp_path / "two")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "two" / "records.jsonl").read_text().splitlines()[1])
    assert {p["label"] for p in rec["predictions"]} == {"red", "blue"}
    assert sum(p["probability"] for p in rec["predictions"]) == pytest.approx(1.0, abs=1e-5)
    (entry,) = rec["explanations"]
    assert entry["target"]["label"] == "blue" and entry["target"]["index"] == 1

    prints = {}
    for name, text in (("a", ("red",)), ("b", ("blue",)), ("c", ("red", "blue"))):
        prints[name] = Session.open(ExplainOptions(model=str(folder), text=text, device="cpu", quiet=True)).fingerprint()
    assert len(set(prints.values())) == 3


def test_text_errors_exit_2_before_any_image_work(tmp_path: Path) -> None:
    image = save_rgb(tmp_path / "img.png", noise_image(0))
    out = ["--out", str(tmp_path / "o"), "-q"]
    r = runner.invoke(app, ["explain", str(image), "--model", "toymodels:tiny_cnn", "--text", "red", *out])
    assert r.exit_code == 2 and "toymodels:tiny_cnn" in r.output and "no text tower" in r.output
    assert not (tmp_path / "o" / "records.jsonl").exists()

    folder = save_clip(tmp_path / "clip", toymodels.clip_model())
    r = runner.invoke(app, ["explain", str(image), "--model", str(folder), *out])
    assert r.exit_code == 2 and "--text" in r.output and "--reference" in r.output
    r = runner.invoke(app, ["explain", str(image), "--model", str(folder), "--text", "red", "--class", "0", *out])
    assert r.exit_code == 2 and "drop --class" in r.output
    r = runner.invoke(app, ["explain", str(image), "--model", str(folder), "--text", "red", "--text", "red", *out])
    assert r.exit_code == 2 and "twice" in r.output
    r = runner.invoke(app, ["explain", str(image), "--model", str(folder), "--text", "red", "--reference", str(image),
                            *out])
    assert r.exit_code == 2 and "not both" in r.output

    bare = save_clip(tmp_path / "bare", toymodels.clip_model(), tokenizer=False)
    with pytest.raises(UsageError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt"):
        Session.open(ExplainOptions(model=str(bare), text=("red",), device="cpu", quiet=True))


def test_reference_explains_a_clip_image_embedding(tmp_path: Path) -> None:
    """Without --text the image tower's output is its embedding: --reference compares two images."""
    folder = save_clip(tmp_path / "clip", toymodels.clip_model(seed=5))
    ref = save_rgb(tmp_path / "ref.png", noise_image(9))
    s = Session.open(ExplainOptions(model=str(folder), reference=str(ref), device="cpu", quiet=True))
    assert isinstance(s.specs[0], tgt.Reference) and s.specs[0].embedding.shape == (8,)  # projection_dim
    (out,) = s.explain_images(uint8_batch(np.asarray(Image.open(ref))))
    assert out.maps[0].score == pytest.approx(1.0, abs=1e-5)


def test_evaluate_follows_one_prompts_similarity(tmp_path: Path) -> None:
    """evaluate with one --text: the record's value is logit_scale * cos(image, prompt), worked by hand."""
    from camcli.evaluate import evaluate
    from camcli.options import EvaluateOptions

    clip = toymodels.clip_model(seed=3)
    folder = save_clip(tmp_path / "clip", clip)
    (tmp_path / "in").mkdir()
    image = save_rgb(tmp_path / "in" / "a.png", noise_image(1))
    res = evaluate([image], EvaluateOptions(model=str(folder), text=("red",), out=str(tmp_path / "ev"), steps=2,
                                            metric="deletion_auc", device="cpu", quiet=True))
    assert res.exit_code == 0
    rec = next(res.records())
    _, score = hand_gradcam(clip, Session.open(ExplainOptions(model=str(folder), text=("red",), quiet=True)).preprocess
                            .normalize(uint8_batch(noise_image(1)).clone()), "red")
    assert rec["target"]["kind"] == "text" and rec["target"]["prompt"] == "red"
    assert rec["target"]["value"] == pytest.approx(score, abs=1e-4)
    assert np.isfinite(rec["metrics"]["gradcam"]["deletion_auc"]["value"]
                       if isinstance(rec["metrics"]["gradcam"]["deletion_auc"], dict)
                       else rec["metrics"]["gradcam"]["deletion_auc"])
