"""`camcli evaluate`: every metric against hand-computed values, then the real model on the photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from camcli import metrics as M
from camcli.cli import app
from camcli.errors import UsageError
from camcli.evaluate import EvaluateOptions, evaluate, parse_metrics
from camcli.metric_registry import available_metrics

# Toy: a 4x4 image whose left half is 1 and right half 0 (all three channels); the "model" scores
# the mean of the left half. Mean colour = 0.5. A perfect map ranks the left half first.
X = torch.zeros(3, 4, 4)
X[:, :, :2] = 1.0
GOOD = torch.zeros(4, 4)
GOOD[:, :2] = 1.0


def score(batch: torch.Tensor) -> torch.Tensor:
    return batch[:, 0, :, :2].mean(dim=(1, 2))


def test_deletion_auc_by_hand() -> None:
    # one pixel per step (16 steps): the left half loses 0.5/8 per step, then the curve stays at 0.5
    # AUC = int_0^.5 (1 - t) dt + 0.5 * 0.5 = 0.375 + 0.25 = 0.625; worst order: 0.5 + 0.375 = 0.875
    curve = M.deletion_curve(X, GOOD, score, steps=16)
    assert curve[0] == 1.0 and curve[8] == 0.5 and curve[16] == 0.5
    assert M.auc(curve) == pytest.approx(0.625)
    assert M.auc(M.deletion_curve(X, 1 - GOOD, score, steps=16)) == pytest.approx(0.875)


def test_insertion_auc_by_hand() -> None:
    # from an all-zero start: i/8 for the first 8 steps, then 1: AUC = 0.25 + 0.5 = 0.75
    curve = M.insertion_curve(X, GOOD, score, steps=16, start=torch.zeros_like(X))
    assert M.auc(curve) == pytest.approx(0.75)
    # default start is a Gaussian blur of the image
    assert torch.allclose(M.insertion_curve(X, GOOD, score, steps=4)[0], score(M.blurred(X)[None]))


def test_auc_trapezoid() -> None:
    assert M.auc(torch.tensor([0.0, 1.0])) == pytest.approx(0.5)
    assert M.auc(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(0.75)


def test_average_drop_increase_and_complexity() -> None:
    half = GOOD * 0.5
    o = float(score(M.explanation_image(X, half, (0, 0, 0), (1, 1, 1))[None])[0])
    assert o == pytest.approx(0.5)
    assert M.average_drop(1.0, o) == pytest.approx(50.0)
    assert M.increase_in_confidence(1.0, o) == 0.0 and M.increase_in_confidence(0.4, o) == 100.0
    # an all-ones map keeps the whole image: no drop, but the worst possible complexity
    ones = torch.ones(4, 4)
    o1 = float(score(M.explanation_image(X, ones, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))[None])[0])
    assert M.average_drop(1.0, o1) == 0.0 and M.complexity(ones) == 1.0 and M.complexity(GOOD) == 0.5


def test_linear_imputation_by_hand() -> None:
    # a linear ramp: any removed interior pixel is imputed exactly (weighted mean of its neighbours)
    ramp = np.tile(np.arange(6, dtype=np.float64), (3, 5, 1))  # (3, 5, 6): value = x
    removed = np.zeros((5, 6), bool)
    removed[2, 2] = removed[2, 3] = removed[1, 3] = True
    out = M.noisy_linear_impute(ramp, removed, 0.0, np.random.default_rng(0))
    assert np.allclose(out, ramp)
    noisy = M.noisy_linear_impute(ramp, removed, 0.5, np.random.default_rng(0))
    assert np.allclose(noisy[:, ~removed], ramp[:, ~removed]) and not np.allclose(noisy, ramp)


def test_road_by_hand() -> None:
    # remove the left half (MoRF 50%): it is imputed from the zero right half -> score 0.
    # remove the right half (LeRF 50%): the left half is untouched -> score 1. Combined (1 - 0)/2.
    morf, lerf, comb = M.road(X, GOOD + 0.01 * torch.rand(4, 4), score, (0, 0, 0), (1, 1, 1), percentages=[50], noise=0)
    assert morf == pytest.approx(0.0, abs=1e-9) and lerf == pytest.approx(1.0) and comb == pytest.approx(0.5)


def test_pointing_games_by_hand() -> None:
    cam = np.zeros((4, 4))
    cam[1, 1] = 1.0
    cam[3, 3] = 0.5
    assert M.energy_pointing_game(cam, [[0, 0, 2, 2]]) == pytest.approx(1 / 1.5)
    assert M.pointing_game(cam, [[0, 0, 2, 2]]) == 1.0
    assert M.pointing_game(cam, [[2, 2, 4, 4]]) == 0.0
    assert M.energy_pointing_game(cam, [[0, 0, 2, 2], [3, 3, 4, 4]]) == pytest.approx(1.0)


def test_baseline_maps() -> None:
    c = M.center_map(9, 13)
    assert c.argmax() == 4 * 13 + 6 and float(c.max()) == pytest.approx(1.0)
    r1, r2 = M.random_map(8, 8, 1, grid=(2, 2)), M.random_map(8, 8, 1, grid=(2, 2))
    assert torch.equal(r1, r2) and not torch.equal(r1, M.random_map(8, 8, 2, grid=(2, 2)))


def test_metric_names_are_checked() -> None:
    with pytest.raises(UsageError, match="did you mean 'deletion_auc'"):
        parse_metrics(("deleton_auc",), False)
    with pytest.raises(UsageError, match="needs --boxes"):
        parse_metrics(("pointing_game",), False)
    assert "pointing_game" in parse_metrics(None, True)


def test_gradcam_beats_random_on_the_sample_photos(samples: Path, tmp_path: Path, bundled) -> None:  # noqa: ANN001
    photos = [samples / n for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    res = evaluate(photos, EvaluateOptions(metric="deletion_auc,insertion_auc", steps=25, out=str(tmp_path)),
                   model=bundled)
    g, r = res.aggregate["gradcam"], res.aggregate["baseline:random"]
    assert g["deletion_auc"]["mean"] < g["insertion_auc"]["mean"]
    assert g["deletion_auc"]["mean"] < r["deletion_auc"]["mean"]
    assert g["insertion_auc"]["mean"] > r["insertion_auc"]["mean"]
    assert g["deletion_auc"]["beats_baselines"] in (True, False) and g["deletion_auc"]["n"] == 3


def test_evaluation_is_deterministic_and_complete(samples: Path, tmp_path: Path, bundled) -> None:  # noqa: ANN001
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"chelsea.jpg": [[80, 70, 380, 290]]}))
    opts = dict(metric=None, boxes=str(boxes), steps=4, batch_size=8)
    a = evaluate([samples / "chelsea.jpg"], EvaluateOptions(out=str(tmp_path / "a"), **opts), model=bundled)
    b = evaluate([samples / "chelsea.jpg"], EvaluateOptions(out=str(tmp_path / "b"), **opts), model=bundled)
    assert a.aggregate == b.aggregate
    doc = json.loads(a.path.read_text())
    assert set(doc["aggregate"]) == {"gradcam", "baseline:random", "baseline:center"}
    assert set(doc["aggregate"]["gradcam"]) == {m.name for m in available_metrics()} and len(doc["metrics"]) == 11
    for stats in doc["aggregate"]["gradcam"].values():
        assert {"mean", "std", "n"} <= set(stats) and stats["n"] == 1
    assert a.images[0]["metrics"]["gradcam"]["pointing_game"] == 1.0
    assert doc["aggregate"]["baseline:center"]["sanity_spearman"]["mean"] == 1.0
    assert doc["settings"]["seed"] == 0 and doc["settings"]["steps"] == 4


def test_cli_table_json_and_plots(samples: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["evaluate", str(samples / "coffee.jpg"), "--metric", "deletion_auc,insertion_auc,complexity",
                                 "--steps", "5", "--plots", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "baseline:random" in r.stdout and "deletion_auc" in r.stdout
    assert (tmp_path / "evaluation.json").is_file()
    assert (tmp_path / "deletion_curve.png").is_file() and (tmp_path / "insertion_curve.png").is_file()
    r = CliRunner().invoke(app, ["evaluate", str(samples / "coffee.jpg"), "--metric", "pointing_game"])
    assert r.exit_code == 2 and "--boxes" in r.output


# -- --boxes is validated like a check file --------------------------------------------------------
@pytest.fixture
def photos(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 100, 50)).save(d / "chelsea.jpg")
    Image.new("RGB", (40, 30), (20, 100, 150)).save(d / "sub" / "chelsea.jpg")
    Image.new("RGB", (40, 30), (90, 10, 250)).save(d / "sub" / "mug.png")
    return d


def _boxes_run(photos: Path, tmp_path: Path, boxes: object) -> object:  # noqa: ANN401
    f = tmp_path / "boxes.yaml"
    f.write_text(boxes if isinstance(boxes, str) else json.dumps(boxes))
    return CliRunner().invoke(app, ["evaluate", str(photos), "-r", "--model", "toymodels:tiny_cnn", "--metric",
                                    "pointing_game", "--boxes", str(f), "--out", str(tmp_path / "ev"), "-q"])


@pytest.mark.parametrize(
    "boxes,message",
    [
        ({"cat.jpg": [[0, 0, 10, 10]]}, "'cat.jpg' matches no input image"),
        ({"mug.png": [[10, 10, 5, 20]]}, "'mug.png': box [10.0, 10.0, 5.0, 20.0] is inverted or empty"),
        ({"mug.png": [[0, 0, 41, 30]]}, "'mug.png': box [0.0, 0.0, 41.0, 30.0] lies outside the 40x30 image"),
        ({"mug.png": []}, "'mug.png': expected a non-empty list of boxes"),
        ({"mug.png": [["0", "0", "5", "5"]]}, "'mug.png': ['0', '0', '5', '5'] is not a box"),
        ({"sub/chelsea.jpg": [[0, 0, 5, 5]], "photos/sub/chelsea.jpg": [[0, 0, 6, 6]]}, "both give boxes"),
        ("- [0, 0, 1, 1]\n", "expected a mapping from image to a list of boxes"),
    ],
)
def test_bad_boxes_exit_2_naming_the_key(photos: Path, tmp_path: Path, boxes: object, message: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(photos.parent)
    r = _boxes_run(photos, tmp_path, boxes)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output


def test_a_box_key_matches_the_relative_path_first_and_a_bare_name_only_when_unique(photos: Path,
                                                                                   tmp_path: Path) -> None:
    def pointed(boxes: dict) -> set[str]:
        r = _boxes_run(photos, tmp_path, boxes)
        assert r.exit_code == 0, r.output
        lines = (tmp_path / "ev" / "evaluation-records.jsonl").read_text().splitlines()
        return {Path(im["path"]).relative_to(photos).as_posix() for im in map(json.loads, lines)
                if "pointing_game" in im["metrics"]["gradcam"]}

    # 'chelsea.jpg' is the relative path of photos/chelsea.jpg only, not of photos/sub/chelsea.jpg
    assert pointed({"chelsea.jpg": [[0, 0, 32, 24]]}) == {"chelsea.jpg"}
    assert pointed({"sub/chelsea.jpg": [[0, 0, 20, 15]], "mug.png": [0, 0, 20, 15]}) == {"sub/chelsea.jpg", "sub/mug.png"}
    (photos / "other").mkdir()
    (photos / "sub" / "chelsea.jpg").rename(photos / "other" / "chelsea.jpg")
    (photos / "chelsea.jpg").rename(photos / "sub" / "chelsea.jpg")  # two chelsea.jpg, neither at the root
    r = _boxes_run(photos, tmp_path, {"chelsea.jpg": [[0, 0, 5, 5]]})
    assert r.exit_code == 2 and "matches 2 images (other/chelsea.jpg, sub/chelsea.jpg); use the relative path" in r.output


# -- sanity_spearman: |rho| over several cascading re-initialisations ------------------------------
def test_sanity_check_fails_guided_backprop_and_passes_gradcam(samples: Path, tmp_path: Path, bundled) -> None:  # noqa: ANN001
    from camcli.sanity import SANITY_SEEDS

    res = evaluate([samples / "chelsea.jpg"], EvaluateOptions(method="gradcam,guided-backprop", metric="sanity_spearman",
                                                              out=str(tmp_path), quiet=True), model=bundled)
    detail = res.images[0]["sanity"]
    gbp, gc = detail["guided-backprop"], detail["gradcam"]
    assert len(gbp["rho"]) == len(gc["rho"]) == SANITY_SEEDS == 3
    assert gbp["mean_abs_rho"] > 0.9 and gbp["spread"] < 0.05  # its map barely changes: it fails the test
    assert gc["mean_abs_rho"] < 0.5  # Grad-CAM's map depends on the trained weights: it passes
    assert res.aggregate["gradcam"]["sanity_spearman"]["mean"] == gc["mean_abs_rho"]
    doc = json.loads(res.path.read_text())
    assert doc["settings"]["sanity"]["seeds"] == 3
    assert doc["settings"]["sanity"]["modules"][0] == "classifier" and doc["settings"]["sanity"]["modules"][-1] == "bn2"


def test_sanity_score_is_undefined_for_empty_maps_never_perfect() -> None:
    from camcli.sanity import sanity_score, spearman

    rng = np.random.default_rng(0)
    cam = rng.random((6, 6))
    flat = np.zeros((6, 6))
    assert spearman(cam, flat) is None
    s = sanity_score(cam, [None, flat, -cam])
    assert s.rho[:2] == [None, None] and s.rho[2] == pytest.approx(-1.0)
    assert s.value == pytest.approx(1.0) and "2 of 3" in s.note  # anti-correlation is no pass
    none = sanity_score(cam, [None, None, None])
    assert none.value is None and none.spread is None and "(no value)" in none.note
    assert sanity_score(flat, [cam]).value is None


# -- batching across images, maps, metrics and steps; the progress bar ----------------------------
def _two_images(tmp_path: Path) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(5)
    paths = []
    for i in range(2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_perturbed_inputs_share_forward_passes_across_images_and_steps(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from camcli.session import Session

    sizes: list[int] = []
    real = Session.logits

    def counting(self, x):  # noqa: ANN001, ANN202
        sizes.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(Session, "logits", counting)
    opts = dict(model="toymodels:tiny_cnn", metric="deletion_auc,insertion_auc,average_drop,road_morf", steps=4,
                road_percentages=(20, 60), quiet=True)
    fast = evaluate(_two_images(tmp_path), EvaluateOptions(out=str(tmp_path / "a"), perturbation_batch=16, **opts))
    # per image: 3 maps (gradcam and two baselines) x (5 + 5 deletion/insertion steps + 1 explanation
    # image + 4 ROAD images) + the image itself = 46; both images fill the same forward passes
    assert sum(sizes) == 92 and sizes == [16] * 5 + [12]
    sizes.clear()
    one = evaluate(_two_images(tmp_path), EvaluateOptions(out=str(tmp_path / "b"), perturbation_batch=1, **opts))
    assert len(sizes) == 92
    # The same probabilities up to float32 round-off (a forward pass over another batch size sums in
    # another order) and the records' rounding to 6 decimals: 2e-6. Average Drop is a percentage of
    # a ratio of probabilities, 100x their scale, so its values agree to 100x that. A mixed-up image,
    # class or curve step would be off by far more.
    def tol(metric: str) -> float:
        return 2e-4 if metric in ("average_drop", "increase_in_confidence") else 2e-6

    for name, row in fast.aggregate.items():
        for metric, st in row.items():
            assert st["mean"] == pytest.approx(one.aggregate[name][metric]["mean"], abs=tol(metric)), (name, metric)
    for a, b in zip(fast.records(), one.records(), strict=True):
        assert a["target"]["probability"] == pytest.approx(b["target"]["probability"], abs=2e-6)
        for name, values in a["metrics"].items():
            for metric, v in values.items():
                assert v == pytest.approx(b["metrics"][name][metric], abs=tol(metric)), (a["path"], name, metric)


def test_evaluate_shows_progress_on_a_terminal_only(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import camcli.progress as P

    made: list[dict] = []

    class Spy(P.Progress):
        def __init__(self, disable: bool = False) -> None:
            super().__init__(disable)
            self.seen = {"disable": disable, "total": None, "done": 0}
            made.append(self.seen)

        def start(self, total: int) -> None:
            self.seen["total"] = total

        def update(self, n: int) -> None:
            self.seen["done"] += n

    monkeypatch.setattr(P, "Progress", Spy)
    images = [str(p) for p in _two_images(tmp_path)]
    args = ["evaluate", *images, "--model", "toymodels:tiny_cnn", "--metric", "complexity", "--out", str(tmp_path / "e")]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert CliRunner().invoke(app, [*args, "-q"]).exit_code == 0
    assert [m["disable"] for m in made] == [False, True]
    assert made[0]["total"] == 2 and made[0]["done"] == 2
    bar = P.Progress()  # the real one hides itself when stderr is not a terminal (as under pytest)
    assert bar.disable
