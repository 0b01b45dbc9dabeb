"""Black-box methods (issue 22, item 3): occlusion against captum's Occlusion and by hand, RISE
against the paper's algorithm written here, both through the engine, the options and the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import CamEngine, EngineConfig
from camcli.errors import UsageError
from camcli.maps import finalize
from camcli.methods import CamInputs, MethodOptions, get_method
from camcli.methods.blackbox import window_starts
from camcli.options import ExplainOptions
from camcli.session import Session
from camcli.targets import ClassIndex, parse_class_specs

runner = CliRunner()
TINY = "toymodels:tiny_cnn"


class SmallNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> linear: non-linear in the input, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class RegionSums(nn.Module):
    """Class k's score is weights[k] times the sum of the input (every channel) over boxes[k]: linear,
    and blind outside its box. ``body`` is a layer for the engine to tap (unused by these methods)."""

    def __init__(self, boxes: list[tuple[int, int, int, int]], weights: list[float]) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.boxes = boxes
        self.weights = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)
        return torch.stack([w * z[:, :, y0:y1, x0:x1].sum(dim=(1, 2, 3))
                            for (y0, x0, y1, x1), w in zip(self.boxes, self.weights)], dim=1)


def raw_map(name: str, model: nn.Module, x: torch.Tensor, classes: list[int], **options: object) -> torch.Tensor:
    """The method's raw map (B, H, W), before ReLU and normalisation, with a scorer that reads the class's logit."""
    def scorer(inputs: torch.Tensor, image_index: int) -> torch.Tensor:
        with torch.inference_mode():
            return model(inputs)[:, classes[image_index]].float()

    inputs = CamInputs(torch.zeros(x.shape[0], 1, 1, 1), torch.tensor(classes), options=MethodOptions(**options),
                       method=get_method(name), scorer=scorer, inputs=x)
    return get_method(name).fn(inputs)


def engine_maps(name: str, model: nn.Module, layer: str, x: torch.Tensor, spec: object, signed: bool = False,
                **options: object) -> np.ndarray:
    engine = CamEngine(model.eval(), EngineConfig([layer], [get_method(name)], options=MethodOptions(**options),
                                                   signed=signed))
    engine.check(x[:1])
    outs = engine.maps(x, [spec])
    assert all(o.maps[0].layer == "input" for o in outs)  # the layer plays no part
    return np.stack([o.maps[0].cam for o in outs])


# -- occlusion --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,window,stride,fill", [((20, 24), 4, 4, 0.0), ((22, 27), 6, 4, -0.5)])
def test_occlusion_equals_captum(size: tuple[int, int], window: int, stride: int, fill: float) -> None:
    from captum.attr import Occlusion

    model = SmallNet().eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    classes = [0, 2]
    theirs = Occlusion(model).attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                        baselines=fill, target=classes)
    assert torch.allclose(theirs[:, 0], theirs[:, 2])  # the window covers every colour channel
    ours = raw_map("occlusion", model, x, classes, occlusion_window=window, occlusion_stride=stride,
                   occlusion_fill=fill, perturbation_batch=7)
    torch.testing.assert_close(ours, theirs[:, 0].float(), atol=1e-5, rtol=1e-5)
    # through the engine: the same map after the one ReLU + min-max every method gets. The raw maps
    # agree to 1e-5 above; min-max divides by the map's span, which magnifies the float32 rounding of
    # score differences (drops are a few % of the score here) up to ~2e-5, hence 1e-4 and Pearson.
    got = engine_maps("occlusion", model, "features.2", x, ClassIndex(classes[0]), occlusion_window=window,
                      occlusion_stride=stride, occlusion_fill=fill)[0]
    expected = finalize(theirs[:1, 0].float())[0][0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9999


def test_window_starts_follow_captum_and_cover_every_pixel() -> None:
    assert window_starts(8, 4, 2) == [0, 2, 4]
    assert window_starts(10, 4, 4) == [0, 4, 8]  # the last window is cut at the edge, as captum's
    assert window_starts(5, 16, 8) == [0]  # a window larger than the image is the whole image


def test_occlusion_by_hand_on_a_linear_region_score() -> None:
    # score = 2 * (sum of every channel over rows 2..4, columns 2..4) on an 8x8 image of ones, so
    # occluding window W (fill 0) drops the score by 2 * 3 channels * |W n R| = 6 * overlap_rows * overlap_cols.
    # Windows of 4 at stride 2 start at 0, 2, 4 along each side: [0,4) [2,6) [4,8), overlapping the
    # region's rows {2,3,4} in 2, 3 and 1 rows. Each pixel averages the windows covering it, and the
    # average factors by side: rows 0-1: window 0 only -> 2; rows 2-3: windows 0, 2 -> (2 + 3) / 2 = 2.5;
    # rows 4-5: windows 2, 4 -> (3 + 1) / 2 = 2; rows 6-7: window 4 -> 1.
    model = RegionSums([(2, 2, 5, 5)], [2.0])
    x = torch.ones(1, 3, 8, 8)
    r = torch.tensor([2, 2, 2.5, 2.5, 2, 2, 1, 1])
    expected = 6 * torch.outer(r, r)
    assert expected[0, 0] == 24 and expected[3, 3] == 37.5 and expected[7, 7] == 6
    got = raw_map("occlusion", model, x, [0], occlusion_window=4, occlusion_stride=2, occlusion_fill=0.0)
    assert torch.equal(got[0], expected)
    # the engine: ReLU, then min-max from 6 to 37.5
    np.testing.assert_allclose(engine_maps("occlusion", model, "body", x, ClassIndex(0), occlusion_window=4,
                                           occlusion_stride=2)[0], ((expected - 6) / 31.5).numpy(), atol=1e-6)


def test_occlusion_fill_is_the_patch_value_in_the_normalised_input() -> None:
    # fill 1 on an image of ones changes nothing: every drop is 0 and the map is blank
    model = RegionSums([(2, 2, 5, 5)], [2.0])
    got = raw_map("occlusion", model, torch.ones(1, 3, 8, 8), [0], occlusion_window=4, occlusion_stride=2,
                  occlusion_fill=1.0)
    assert torch.equal(got, torch.zeros(1, 8, 8))


def test_occlusion_refuses_a_stride_larger_than_the_window() -> None:
    engine = CamEngine(SmallNet().eval(), EngineConfig(["features.2"], [get_method("occlusion")],
                                                       options=MethodOptions(occlusion_window=4, occlusion_stride=5)))
    with pytest.raises(UsageError, match=r"--occlusion-stride 5 is larger than --occlusion-window 4"):
        engine.check(torch.zeros(1, 3, 16, 16))


# -- RISE -------------------------------------------------------------------------------------------
def paper_rise(score: object, x: torch.Tensor, n: int, s: int, p: float, seed: int) -> tuple[torch.Tensor, ...]:
    """RISE as the paper's code (Petsiuk et al. 2018, github.com/eclique/RISE, explanations.py): N binary
    s x s grids, each cell kept with probability p; each grid upsampled bilinearly to (s + 1) * cell,
    cell = ceil(side / s), and cropped at a random shift in [0, cell); saliency = sum_i score(x * M_i)
    M_i / (N p). The draws come from one seeded CPU generator in camcli's order (grids, then row shifts,
    then column shifts), so both draw the same masks; the upsampling and cropping are done here, one
    mask at a time. Returns (saliency, scores, masks) for one image x (1, 3, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    grid = (torch.rand((n, s, s), generator=gen) < p).float()
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    masks = []
    for i in range(n):
        up = F.interpolate(grid[i][None, None], size=((s + 1) * ch, (s + 1) * cw), mode="bilinear",
                           align_corners=False)[0, 0]
        masks.append(up[int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w])
    m = torch.stack(masks)
    scores = torch.cat([score(x * m[i : i + 10, None]) for i in range(0, n, 10)])  # type: ignore[operator]
    sal = (scores @ m.reshape(n, -1)).reshape(h, w) / n / p
    return sal, scores, m


def test_rise_equals_the_papers_algorithm_with_the_mean_score_taken_out() -> None:
    model = SmallNet().eval()
    x = torch.randn(2, 3, 20, 26, generator=torch.Generator().manual_seed(2))
    classes = [1, 2]
    n, s, p, seed = 60, 4, 0.4, 5
    ours = raw_map("rise", model, x, classes, rise_masks=n, rise_grid=s, rise_keep=p, seed=seed, perturbation_batch=7)
    for b, c in enumerate(classes):
        with torch.inference_mode():
            sal, scores, m = paper_rise(lambda z, c=c: model(z)[:, c], x[b : b + 1], n, s, p, seed)
        assert m.min() >= 0 and m.max() <= 1 + 1e-6 and m.shape == (n, 20, 26)
        # camcli's map is the paper's saliency less its uniform part: mean score x sum of masks / (N p)
        centred = sal - scores.mean() * m.sum(dim=0) / (n * p)
        torch.testing.assert_close(ours[b], centred, atol=1e-5, rtol=1e-5)


def test_rise_masks_do_not_depend_on_the_batch_and_follow_the_seed() -> None:
    model = SmallNet().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    opts = dict(rise_masks=40, rise_grid=3)
    whole = raw_map("rise", model, x, [0, 0, 0], perturbation_batch=16, **opts)
    alone = raw_map("rise", model, x[2:], [0], perturbation_batch=3, **opts)
    torch.testing.assert_close(whole[2], alone[0], atol=1e-5, rtol=1e-5)
    other = raw_map("rise", model, x[2:], [0], seed=1, **opts)
    assert not torch.allclose(other[0], alone[0], atol=1e-4)


@pytest.mark.parametrize("name", ["rise", "occlusion"])
def test_maps_are_class_discriminative_on_a_model_that_reads_one_region_per_class(name: str) -> None:
    # class 0 reads the top-left 8x8 corner of a 32x32 image, class 1 the bottom-right one
    model = RegionSums([(0, 0, 8, 8), (24, 24, 32, 32)], [1.0, 1.0])
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) + 0.5
    for cls, (y0, x0) in ((0, (0, 0)), (1, (24, 24))):
        cam = engine_maps(name, model, "body", x, ClassIndex(cls), rise_masks=400, rise_grid=4)[0]
        py, px = np.unravel_index(np.argmax(cam), cam.shape)
        assert y0 <= py < y0 + 8 and x0 <= px < x0 + 8, (name, cls, (py, px))
        outside = np.ones_like(cam, dtype=bool)
        outside[max(0, y0 - 8) : y0 + 16, max(0, x0 - 8) : x0 + 16] = False
        assert cam[outside].max() < 0.5 * cam.max()  # far from the region the map is low


@pytest.mark.parametrize("name", ["rise", "occlusion"])
def test_not_k_gives_the_negated_map(name: str) -> None:
    # not:K explains -y^K: every score difference changes sign, so the signed map is the negation
    model = SmallNet().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    (pos,) = parse_class_specs(["1"], None, 3)
    (neg,) = parse_class_specs(["not:1"], None, 3)
    kw = dict(rise_masks=32, rise_grid=3, occlusion_window=4, occlusion_stride=4)
    a = engine_maps(name, model, "features.2", x, pos, signed=True, **kw)
    b = engine_maps(name, model, "features.2", x, neg, signed=True, **kw)
    np.testing.assert_allclose(a, -b, atol=1e-5)
    assert np.abs(a).max() == pytest.approx(1.0)


# -- options, fingerprint, CLI ----------------------------------------------------------------------
def test_rise_and_occlusion_record_the_values_they_used_in_the_fingerprint() -> None:
    def shaping(**kw: object) -> dict[str, object]:
        return Session.open(ExplainOptions(model=TINY, quiet=True, **kw)).shaping()

    plain = shaping()
    assert not {"rise_masks", "occlusion_window"} & set(plain)  # other methods keep their fingerprints
    rise = shaping(method="rise")
    assert (rise["rise_masks"], rise["rise_grid"], rise["rise_keep"], rise["seed"]) == (1000, 7, 0.5, 0)
    assert shaping(method="rise", rise_masks=1000) == rise  # the default, given or not
    assert shaping(method="rise", rise_masks=64)["rise_masks"] == 64
    assert shaping(method="rise", seed=3)["seed"] == 3
    occ = shaping(method="occlusion")
    assert (occ["occlusion_window"], occ["occlusion_stride"], occ["occlusion_fill"]) == (16, 8, 0.0)
    fingerprints = {Session.open(ExplainOptions(model=TINY, quiet=True, **kw)).fingerprint() for kw in (
        {}, {"method": "rise"}, {"method": "rise", "rise_masks": 64}, {"method": "rise", "seed": 3})}
    assert len(fingerprints) == 4


def test_bad_black_box_options_exit_2_naming_the_value(small_images: Path, tmp_path: Path) -> None:
    for flags, message in (
        (["--rise-keep", "0"], "--rise-keep 0.0 is out of range"),
        (["--rise-masks", "0"], "--rise-masks 0 must be at least 1"),
        (["-M", "occlusion", "--occlusion-window", "4", "--occlusion-stride", "8"],
         "--occlusion-stride 8 is larger than --occlusion-window 4"),
    ):
        r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--model", TINY, "--out", str(tmp_path / "o"),
                                *flags])
        assert r.exit_code == 2, r.output
        assert message in r.output, r.output


def test_cli_writes_occlusion_and_rise_maps(small_images: Path, tmp_path: Path) -> None:
    for flags, method in ((["--method", "occlusion"], "occlusion"), (["--method", "rise", "--rise-masks", "64"], "rise")):
        out = tmp_path / method
        r = runner.invoke(app, ["explain", str(small_images), "--model", TINY, "--image-size", "64", "--out", str(out),
                                "--save-raw", "-q", *flags])
        assert r.exit_code == 0, r.output
        assert (out / f"a.{method}.png").is_file() and (out / f"b.{method}.png").is_file()
        raw = np.load(out / f"a.{method}.npy")
        assert raw.shape == (40, 60) and np.isfinite(raw).all() and raw.max() > 0


def test_method_all_runs_the_black_box_methods(small_images: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--model", TINY, "-M", "all", "--image-size", "32",
                            "--rise-masks", "32", "--score-channels", "2", "--samples", "1", "--out", str(tmp_path),
                            "-q"])
    assert r.exit_code == 0, r.output
    written = {p.name.split(".")[1] for p in tmp_path.glob("a.*.png")}
    assert {"occlusion", "rise", "gradcam"} <= written
