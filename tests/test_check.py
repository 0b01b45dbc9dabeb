"""`camcli check` on the real sample photos with the bundled model: pass, fail, file errors, reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import yaml
from typer.testing import CliRunner

from camcli.check import run_check
from camcli.checkfile import CheckFileError
from camcli.cli import app

runner = CliRunner()
FACE = [80, 70, 380, 290]
WRONG = [380, 0, 451, 80]  # the background, top right of chelsea.jpg


@pytest.fixture
def workdir(tmp_path: Path, samples: Path) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(samples / name, tmp_path / "images" / name)
    return tmp_path


def write(workdir: Path, doc: dict, name: str = "check.yaml") -> Path:
    p = workdir / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def cat_case(**expect: object) -> dict:
    return {"image": "images/chelsea.jpg", "class": 285, "expect": expect}


def test_passing_file_writes_junit_json_and_overlays(workdir: Path) -> None:
    doc = {
        "method": ["gradcam", "gradcam++"],
        "cases": [
            cat_case(top_k=1, region=FACE, min_energy_in_region=0.6, peak_in_region=True),
            {"image": "images/coffee.jpg", "class": "espresso",
             "expect": {"top_k": 1, "region": [0.28, 0.03, 0.7, 0.6], "peak_in_region": True}},
        ],
    }
    f = write(workdir, doc)
    r = runner.invoke(app, ["check", str(f), "--junit", str(workdir / "r.xml"), "--json", str(workdir / "r.json"),
                            "--out", str(workdir / "ov")])
    assert r.exit_code == 0, r.output
    assert "min_energy_in_region" in r.stdout and "pass" in r.stdout
    suite = ET.parse(workdir / "r.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 4 and suite.get("failures") == "0"
    assert not any(c.find("failure") is not None for c in cases)
    rep = json.loads((workdir / "r.json").read_text())
    assert rep["passed"] and len(rep["rules"]) == 2 * 3 + 2 * 2
    assert sorted(p.name for p in (workdir / "ov").iterdir()) == [
        "000-chelsea.gradcam.png", "000-chelsea.gradcampp.png", "001-coffee.gradcam.png", "001-coffee.gradcampp.png"]


def test_box_on_the_wrong_object_fails(workdir: Path) -> None:
    f = write(workdir, {"cases": [cat_case(region=WRONG, min_energy_in_region=0.3, peak_in_region=True)]})
    r = runner.invoke(app, ["check", str(f), "--junit", str(workdir / "r.xml")])
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.stdout
    tc = ET.parse(workdir / "r.xml").getroot().find("testsuite").find("testcase")
    failure = tc.find("failure")
    assert failure is not None and "min_energy_in_region" in failure.get("message")
    assert "peak_in_region" in failure.get("message")


def test_wrong_expected_class_fails(workdir: Path, bundled) -> None:  # noqa: ANN001
    f = write(workdir, {"cases": [{"image": "images/chelsea.jpg", "class": "espresso", "expect": {"top_k": 5}}]})
    rep = run_check(f, model=bundled)
    assert rep.exit_code == 1
    (rule,) = rep.rules
    assert rule.rule == "top_k" and not rule.passed and rule.value > 5 and "espresso" in rule.message


def test_baselines_update_report_and_layer_change(workdir: Path, bundled) -> None:  # noqa: ANN001
    doc = {"layer": "blocks.4", "baselines": "base", "cases": [cat_case(min_baseline_similarity=0.9)]}
    f = write(workdir, doc)
    # no baseline yet: a file error with the way out, never a silent pass
    with pytest.raises(CheckFileError, match="--update-baselines"):
        run_check(f, model=bundled)
    rep = run_check(f, update_baselines=True, model=bundled)
    assert [b["status"] for b in rep.baselines] == ["new"]
    assert (workdir / "base" / "000-chelsea.gradcam.npy").is_file()
    assert (workdir / "base" / "000-chelsea.gradcam.png").is_file()
    assert run_check(f, model=bundled).passed
    rep = run_check(f, update_baselines=True, model=bundled)
    assert [b["status"] for b in rep.baselines] == ["unchanged"]
    # a baseline from a different layer fails against the default layer's map
    f2 = write(workdir, {**doc, "layer": "bn2"}, "other.yaml")
    rep = run_check(f2, model=bundled)
    (rule,) = rep.rules
    assert not rule.passed and rule.value < 0.9 and "blocks.4" in rule.message
    r = runner.invoke(app, ["check", str(f2), "--update-baselines"])
    assert r.exit_code == 0 and "changed" in r.stdout


def test_results_are_deterministic(workdir: Path, bundled) -> None:  # noqa: ANN001
    f = write(workdir, {"method": "gradcam++", "cases": [cat_case(region=FACE, min_energy_in_region=0.1)]})
    a = run_check(f, model=bundled).rules[0].value
    b = run_check(f, model=bundled).rules[0].value
    assert abs(a - b) <= 1e-6


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"cases": [cat_case(min_enrgy_in_region=0.5)]}, "cases[0].expect: unknown key 'min_enrgy_in_region'"),
        ({"cases": [cat_case(region=[0, 0, 900, 100], min_energy_in_region=0.5)]}, "lies outside the 451x300 image"),
        ({"cases": [cat_case(region=FACE, min_energy_in_region=1.5)]}, "min_energy_in_region: 1.5 is not a bound in [0, 1]"),
        ({"cases": [{"image": "images/nope.jpg"}]}, "cases[0].image: image"),
        ({"cases": [cat_case(min_baseline_similarity=0.9)], "baselines": "none-here"}, "is missing; create it"),
        ({"cases": [cat_case(top_k=1) | {"class": "zebraa"}]}, "cases[0].class: unknown class 'zebraa'"),
        ({"cases": [cat_case(peak_in_region=True)]}, "need a region or region_mask"),
        ({"metod": "gradcam", "cases": [cat_case()]}, "top level: unknown key 'metod'; did you mean 'method'"),
        ({"method": "gradcm", "cases": [cat_case()]}, "method: unknown method 'gradcm'"),
        ({"cases": []}, "cases: expected a non-empty list"),
        ({"cases": [cat_case(region=[1, 2, 3])]}, "[1, 2, 3] is not a box [x0, y0, x1, y1]"),
    ],
)
def test_file_errors_exit_2(workdir: Path, doc: dict, message: str) -> None:
    f = write(workdir, doc)
    r = runner.invoke(app, ["check", str(f)])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert str(f) in " ".join(r.output.split())


def test_region_mask_rule(workdir: Path, bundled) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    mask = np.zeros((300, 451), np.uint8)
    mask[70:290, 80:380] = 255
    Image.fromarray(mask).save(workdir / "mask.png")
    f = write(workdir, {"cases": [{"image": "images/chelsea.jpg", "expect": {
        "region_mask": "mask.png", "min_energy_in_region": 0.6, "peak_in_region": True}}]})
    rep = run_check(f, model=bundled)
    assert rep.passed and rep.rules[0].value == pytest.approx(
        run_check(write(workdir, {"cases": [cat_case(region=FACE, min_energy_in_region=0.6)]}, "b.yaml"),
                  model=bundled).rules[0].value, abs=1e-6)


def test_shipped_example_passes() -> None:
    example = Path(__file__).resolve().parents[1] / "configs" / "check-example.yaml"
    r = runner.invoke(app, ["check", str(example)])
    assert r.exit_code == 0, r.output


# -- mistakes reported before any case runs ------------------------------------------------------
@pytest.mark.parametrize("where", ["folder", "under-a-file"])
@pytest.mark.parametrize("flag", ["--junit", "--json"])
def test_report_paths_are_checked_before_the_cases_run(workdir: Path, flag: str, where: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import camcli.check as C

    f = write(workdir, {"model": "toymodels:tiny_cnn", "cases": [{"image": "images/coffee.jpg", "expect": {"top_k": 4}}]})
    (workdir / "afile").write_text("x")
    target = workdir / "reports" if where == "folder" else workdir / "afile" / "r.xml"
    (workdir / "reports").mkdir()
    monkeypatch.setattr(C, "Session", None)  # any attempt to open the model would fail loudly
    r = runner.invoke(app, ["check", str(f), flag, str(target)])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert f"{flag} '{target}'" in text
    assert ("is a folder" in text) if where == "folder" else ("is a file, not a folder" in text)


def test_a_case_without_rules_is_an_error(workdir: Path) -> None:
    f = write(workdir, {"cases": [cat_case(top_k=1), {"image": "images/coffee.jpg", "name": "mug", "expect": {"region": FACE}}]})
    r = runner.invoke(app, ["check", str(f)])
    assert r.exit_code == 2
    assert "cases[1].expect: case 'mug' has no rules" in " ".join(r.output.split())


def test_check_file_images_over_max_pixels_are_file_errors(workdir: Path) -> None:
    f = write(workdir, {"max_pixels": 100_000, "cases": [cat_case(top_k=1)]})
    r = runner.invoke(app, ["check", str(f)])
    assert r.exit_code == 2
    assert "cases[0].image" in r.output and "451x300" in r.output and "--max-pixels" in r.output


def test_model_name_resolves_against_the_files_folder_and_binary_files_exit_2(workdir: Path, tmp_path: Path) -> None:
    import shutil

    sub = workdir / "checks"
    (sub / "images").mkdir(parents=True)
    shutil.copy(workdir / "images" / "coffee.jpg", sub / "images" / "coffee.jpg")
    import torch
    from toymodels import tiny_cnn

    torch.save(tiny_cnn(), sub / "whole.pt")
    f = write(sub, {"model": {"name": "whole.pt", "unsafe_load": True},
                    "cases": [{"image": "images/coffee.jpg", "expect": {"top_k": 4}}]})
    r = runner.invoke(app, ["check", str(f)])  # run from another folder: whole.pt is next to the file
    assert r.exit_code == 0, r.output
    binary = workdir / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    r = runner.invoke(app, ["check", str(binary)])
    assert r.exit_code == 2 and "not a text file" in r.output
