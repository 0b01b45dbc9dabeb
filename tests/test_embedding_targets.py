"""--reference and --target (issue 19, item 2): maps of models that output no class logits, on tiny
models built here, against values worked out by hand (and pytorch-grad-cam's similarity target)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor, nn
from typer.testing import CliRunner

from camcli import targets as tgt
from camcli.cli import app
from camcli.engine import CamEngine, EngineConfig
from camcli.errors import UsageError
from camcli.methods import get_method
from camcli.options import ExplainOptions
from camcli.pipeline import run_explain
from camcli.session import Session

runner = CliRunner()
HERE = "test_embedding_targets"  # this module, importable as module:function (tests/ is on sys.path)


# -- tiny models ----------------------------------------------------------------------------------
class Embedder(nn.Module):
    """conv 3x3 -> global average pool: the pooled features are the embedding (B, K)."""

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, k, 3, padding=1)
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # read by the loader: x = pixels / 255

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean(dim=(2, 3))


class ColourEmbedder(nn.Module):
    """1x1 conv: channel 0 is the red, channel 1 the blue of each pixel; pooled: how red and how blue."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])[:, :, None, None])
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class TwoClass(nn.Module):
    """conv 3x3 -> global average pool -> linear to two logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def embedder() -> nn.Module:
    return Embedder()


def colour_embedder() -> nn.Module:
    return ColourEmbedder()


def two_class() -> nn.Module:
    return TwoClass()


def contrast(out: Tensor) -> Tensor:
    """A --target function: the second logit minus the first."""
    return out[:, 1] - out[:, 0]


def one_number(out: Tensor) -> Tensor:
    """A --target function of the wrong shape: one number for the whole batch."""
    return out.sum()


# -- helpers --------------------------------------------------------------------------------------
def gradcam_map(model: nn.Module, layer: str, x: Tensor, spec: tgt.TargetSpec, signed: bool = True) -> Any:  # noqa: ANN401
    engine = CamEngine(model, EngineConfig([layer], [get_method("gradcam")], signed=signed))
    return engine.maps(x, [spec])[0].maps[0]


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def red_blue(h: int = 32, w: int = 64) -> np.ndarray:
    """Left half red, right half blue."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2, 0] = 255
    rgb[:, w // 2 :, 2] = 255
    return rgb


def plain(colour: tuple[int, int, int], h: int = 32, w: int = 32) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


# -- (a) cosine similarity to a reference, by hand ---------------------------------------------------
def test_reference_gradcam_equals_the_hand_worked_map() -> None:
    model = Embedder().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    r = torch.tensor([1.0, -2.0, 0.5, 3.0])
    got = gradcam_map(model, "conv", x, tgt.Reference("r.png", "", r))

    # By hand: e = mean_ij A, s = e.r / (|e||r|); ds/de = r / (|e||r|) - s e / |e|^2; the pool spreads it
    # evenly, so Grad-CAM's weight of channel k is ds/de_k / (h w), and the map is sum_k weight_k A_k.
    with torch.no_grad():
        a = model.conv(x)[0].double().numpy()  # (K, h, w)
    rn = r.double().numpy()
    e = a.mean(axis=(1, 2))
    s = e @ rn / (np.linalg.norm(e) * np.linalg.norm(rn))
    de = rn / (np.linalg.norm(e) * np.linalg.norm(rn)) - s * e / (e @ e)
    cam = np.tensordot(de / (a.shape[1] * a.shape[2]), a, axes=1)
    expected = cam / np.abs(cam).max()  # --signed: scaled by the largest magnitude, nothing cut

    assert got.explained == {"kind": "reference", "reference": "r.png"}
    assert got.target is None and got.probability is None
    assert got.score == pytest.approx(s, abs=1e-6)
    assert cam.min() < 0 < cam.max()  # both signs: the comparison is not of a trivial map
    np.testing.assert_allclose(got.cam, expected, atol=1e-5)


def test_reference_gradcam_agrees_with_pytorch_grad_cam_similarity_target() -> None:
    """pytorch-grad-cam (grad-cam 1.5.7) does not ship SimilarityToConceptTarget: it is defined in its
    embeddings tutorial, copied here as written there. Its GradCAM cuts negatives and scales min-max,
    as camcli's unsigned maps do; the only deviation is its 1e-7 in the division."""
    import pytorch_grad_cam as pgc

    class SimilarityToConceptTarget:  # pytorch-grad-cam's tutorial "Pixel attribution for embeddings"
        def __init__(self, features: Tensor) -> None:
            self.features = features

        def __call__(self, model_output: Tensor) -> Tensor:
            cos = torch.nn.CosineSimilarity(dim=0)
            return cos(model_output, self.features)

    model = Embedder().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    r = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ours = gradcam_map(model, "conv", x, tgt.Reference("r.png", "", r), signed=False)
    with pgc.GradCAM(model=model, target_layers=[model.conv]) as cam:
        theirs = cam(input_tensor=x, targets=[SimilarityToConceptTarget(r)])[0]
    assert ours.cam.shape == theirs.shape == (8, 8) and not ours.empty
    np.testing.assert_allclose(ours.cam, theirs, atol=1e-5)


def test_reference_embedding_is_computed_once_by_the_model_and_explaining_it_gives_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = save_rgb(tmp_path / "ref.png", rng.integers(0, 255, (24, 24, 3)))
    other = save_rgb(tmp_path / "other.png", rng.integers(0, 255, (24, 24, 3)))
    s = Session.open(ExplainOptions(model=f"{HERE}:embedder", reference=str(ref), image_size=24, quiet=True))
    spec = s.specs[0]
    assert isinstance(spec, tgt.Reference) and spec.path == str(ref)
    with torch.no_grad():  # the reference by the same model and preprocessing: pixels / 255 at 24x24
        pixels = torch.from_numpy(np.array(Image.open(ref))).permute(2, 0, 1)[None].float() / 255
        want = s.model.module(pixels)[0]
        theirs = s.model.module(torch.from_numpy(np.array(Image.open(other))).permute(2, 0, 1)[None].float() / 255)[0]
    torch.testing.assert_close(spec.embedding, want, atol=1e-5, rtol=1e-5)

    calls = [0]
    s.model.module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    batch = torch.stack([s.preprocess.resize(np.asarray(Image.open(p))) for p in (ref, other)])
    outs = s.explain_images(batch)
    assert calls[0] == 1  # one forward for the batch: the reference is not encoded again
    same, diff = outs[0].maps[0], outs[1].maps[0]
    assert same.score == pytest.approx(1.0, abs=1e-5)  # an image is its own reference
    assert diff.score == pytest.approx(float(torch.cosine_similarity(theirs, want, dim=0)), abs=1e-5)


# -- (b) the reference decides where the map peaks ---------------------------------------------------
def test_reference_content_decides_which_region_the_map_peaks_on(tmp_path: Path) -> None:
    image = save_rgb(tmp_path / "redblue.png", red_blue())
    peaks = {}
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        ref = save_rgb(tmp_path / f"{name}.png", plain(colour))
        out = tmp_path / f"out-{name}"
        res = run_explain([image], ExplainOptions(model=f"{HERE}:colour_embedder", reference=str(ref), layer="features",
                                                  image_size=32, save_raw=True, out=str(out), quiet=True, workers=0))
        entry = res.images[0]["explanations"][0]
        raw = np.load(out / entry["raw"])
        peaks[name] = "left" if np.unravel_index(raw.argmax(), raw.shape)[1] < raw.shape[1] // 2 else "right"
        # half red, half blue: the embedding is (a, a), so its cosine to (1, 0) or (0, 1) is 1/sqrt(2)
        assert entry["target"] == {"kind": "reference", "reference": str(ref), "value": pytest.approx(0.707107, abs=1e-5)}
        assert raw[:, :28].mean() > raw[:, 36:].mean() if name == "red" else raw[:, 36:].mean() > raw[:, :28].mean()
    assert peaks == {"red": "left", "blue": "right"}


def test_check_case_reference_peaks_on_the_region_of_its_colour(tmp_path: Path) -> None:
    from camcli.check import run_check

    save_rgb(tmp_path / "redblue.png", red_blue())
    save_rgb(tmp_path / "red.png", plain((255, 0, 0)))
    save_rgb(tmp_path / "blue.png", plain((0, 0, 255)))
    f = tmp_path / "check.yaml"
    f.write_text(yaml.safe_dump({
        "model": {"name": f"{HERE}:colour_embedder", "image_size": 32}, "layer": "features",
        "cases": [
            {"image": "redblue.png", "reference": "red.png", "expect": {"region": [0, 0, 32, 32], "peak_in_region": True}},
            {"image": "redblue.png", "reference": "blue.png", "expect": {"region": [32, 0, 64, 32], "peak_in_region": True}},
            {"image": "redblue.png", "reference": "blue.png", "expect": {"region": [0, 0, 32, 32], "peak_in_region": True}},
        ],
    }))
    report = run_check(f)
    assert [r.passed for r in report.rules] == [True, True, False]
    f.write_text(yaml.safe_dump({"model": f"{HERE}:colour_embedder", "cases": [
        {"image": "redblue.png", "reference": "red.png", "expect": {"top_k": 1}}]}))
    with pytest.raises(UsageError, match=r"top_k ranks the case's class"):
        run_check(f)


# -- (c) any callable --------------------------------------------------------------------------------
def test_callable_target_equals_the_contrast_worked_by_hand() -> None:
    model = TwoClass().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    got = gradcam_map(model, "conv", x, tgt.Custom(lambda out: out[:, 1] - out[:, 0], "contrast"))

    # s = y1 - y0 = (W1 - W0) . mean_ij A + b1 - b0: Grad-CAM's weight of channel k is (W1k - W0k) / (h w)
    with torch.no_grad():
        a = model.conv(x)[0].double().numpy()
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    y = w @ a.mean(axis=(1, 2)) + b
    cam = np.tensordot((w[1] - w[0]) / (a.shape[1] * a.shape[2]), a, axes=1)

    assert got.explained == {"kind": "callable", "callable": "contrast"} and got.target is None
    assert got.score == pytest.approx(y[1] - y[0], abs=1e-6)
    assert cam.min() < 0 < cam.max()
    np.testing.assert_allclose(got.cam, cam / np.abs(cam).max(), atol=1e-5)


def test_callable_given_in_python_options_and_as_module_function_give_the_same_map(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3)).astype(np.uint8)

    def explain(target: Any) -> Any:  # noqa: ANN401
        s = Session.open(ExplainOptions(model=f"{HERE}:two_class", target=target, layer="conv", signed=True,
                                        image_size=16, quiet=True))
        return s, s.explain_images(s.preprocess.resize(rgb)[None])[0].maps[0]

    s1, by_name = explain(f"{HERE}:contrast")
    s2, by_lambda = explain(lambda out: out[:, 1] - out[:, 0])
    np.testing.assert_allclose(by_name.cam, by_lambda.cam, atol=1e-6)
    assert by_name.score == pytest.approx(by_lambda.score, abs=1e-6)
    assert s1.record()["target"] == f"{HERE}:contrast" and s1.record()["class"] is None
    assert s2.record()["target"].endswith("<lambda>")  # a callable is recorded by its module:qualname
    assert s1.shaping()["target"] == f"{HERE}:contrast"


def test_callable_of_the_wrong_shape_is_refused_naming_both_shapes() -> None:
    with pytest.raises(UsageError, match=r"returned shape \(\); expected shape \(2,\)"):
        Session.open(ExplainOptions(model=f"{HERE}:two_class", target=f"{HERE}:one_number", image_size=16, quiet=True))
    with pytest.raises(UsageError, match=r"returned shape \(2, 2\); expected shape \(2,\)"):
        Session.open(ExplainOptions(model=f"{HERE}:two_class", target=lambda out: out, image_size=16, quiet=True))
    # an engine used directly finds it on the first batch
    engine = CamEngine(TwoClass().eval(), EngineConfig(["conv"], [get_method("gradcam")]))
    with pytest.raises(UsageError, match=r"returned shape \(3, 1\); expected shape \(3,\)"):
        engine.maps(torch.zeros(3, 3, 8, 8), [tgt.Custom(lambda out: out[:, :1], "first")])


# -- options, records, fingerprint -----------------------------------------------------------------
def test_reference_with_class_or_target_and_cam_are_refused(tmp_path: Path) -> None:
    ref = str(save_rgb(tmp_path / "ref.png", plain((255, 0, 0))))
    with pytest.raises(UsageError, match=r"--reference explains one scalar of the model output, not a class: drop --class"):
        Session.open(ExplainOptions(model=f"{HERE}:embedder", reference=ref, classes="1", quiet=True))
    with pytest.raises(UsageError, match=r"give --reference or --target, not both"):
        Session.open(ExplainOptions(model=f"{HERE}:embedder", reference=ref, target=f"{HERE}:contrast", quiet=True))
    with pytest.raises(UsageError, match=r"--method cam explains a class"):
        Session.open(ExplainOptions(model=f"{HERE}:embedder", reference=ref, method="cam", quiet=True))


def test_fingerprint_follows_the_reference_file_not_only_its_path(tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    opts = ExplainOptions(model=f"{HERE}:embedder", reference=str(ref), quiet=True)
    save_rgb(ref, plain((255, 0, 0)))
    first = Session.open(opts)
    save_rgb(ref, plain((0, 0, 255)))
    second = Session.open(opts)
    plain_run = Session.open(ExplainOptions(model=f"{HERE}:embedder", quiet=True))
    assert first.shaping()["reference_sha256"] != second.shaping()["reference_sha256"]
    assert len({first.fingerprint(), second.fingerprint(), plain_run.fingerprint()}) == 3
    assert "reference" not in plain_run.shaping() and "target" not in plain_run.shaping()  # older runs keep theirs


def test_summary_and_records_say_what_was_explained(tmp_path: Path) -> None:
    image = save_rgb(tmp_path / "img.png", red_blue())
    r = runner.invoke(app, ["explain", str(image), "--model", f"{HERE}:two_class", "--target", f"{HERE}:contrast",
                            "--layer", "conv", "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["options"]["target"] == f"{HERE}:contrast" and summary["shaping"]["target"] == f"{HERE}:contrast"
    rec = json.loads((tmp_path / "o" / "records.jsonl").read_text().splitlines()[1])
    (entry,) = rec["explanations"]
    assert entry["target"]["kind"] == "callable" and entry["target"]["callable"] == f"{HERE}:contrast"
    assert isinstance(entry["target"]["value"], float) and entry["overlay"] == "img.gradcam.png"


# -- (d) the command line --------------------------------------------------------------------------
def test_cli_refuses_a_reference_that_is_no_image_and_a_target_that_cannot_be_imported(tmp_path: Path) -> None:
    image = save_rgb(tmp_path / "img.png", red_blue())
    bad = tmp_path / "notanimage.txt"
    bad.write_text("not pixels")
    base = ["explain", str(image), "--model", f"{HERE}:embedder", "--out", str(tmp_path / "o")]
    r = runner.invoke(app, [*base, "--reference", str(bad)])
    assert r.exit_code == 2 and "--reference" in r.output and "notanimage.txt" in r.output and "not a readable image" in r.output
    r = runner.invoke(app, [*base, "--reference", str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "missing.png" in r.output and "no such file" in r.output
    r = runner.invoke(app, [*base, "--target", "nosuch:fn"])
    assert r.exit_code == 2 and "--target 'nosuch:fn'" in r.output and "cannot import module 'nosuch'" in r.output
    r = runner.invoke(app, [*base, "--target", f"{HERE}:nosuch"])
    assert r.exit_code == 2 and "has no attribute 'nosuch'" in r.output
    r = runner.invoke(app, [*base, "--target", "not a function"])
    assert r.exit_code == 2 and "is not module:function" in r.output
    assert not (tmp_path / "o" / "records.jsonl").exists()
