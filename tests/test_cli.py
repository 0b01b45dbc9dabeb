"""The CLI through Typer's runner: outputs, options, config merging, exit codes, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from camcli.cli import app
from camcli.records import load_run

runner = CliRunner()
TINY = ["--model", "toymodels:tiny_cnn", "--workers", "0", "-q"]


def run(*args: str):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def load_summary(out: Path) -> dict:
    return load_run(out)  # summary.json with the records of records.jsonl under "images"


def test_explain_folder_writes_overlays_summary_and_raw(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("explain", small_images, "-r", "--out", out, "--save-raw", *TINY)
    assert r.exit_code == 0, r.output
    s = load_summary(out)
    assert s["schema_version"] == 2 and s["camcli_version"] and s["torch_version"] == torch.__version__
    assert s["model"]["layer"] == "features"  # the last module to finish with a spatial output
    assert s["counts"] == {"images": 3, "ok": 3, "error": 0, "reused": 0}
    by_path = {Path(im["path"]).relative_to(small_images).as_posix(): im for im in s["images"]}
    assert set(by_path) == {"a.png", "b.jpg", "sub/a.png"}
    im = by_path["sub/a.png"]
    assert (im["width"], im["height"]) == (45, 30)
    assert len(im["predictions"]) == 4 and im["predictions"][0]["probability"] >= im["predictions"][1]["probability"]
    ex = im["explanations"][0]
    assert ex["method"] == "gradcam" and ex["target"]["index"] == im["predictions"][0]["index"]
    assert ex["overlay"] == "sub/a.gradcam.png" and ex["raw"] == "sub/a.gradcam.npy"
    overlay = Image.open(out / ex["overlay"])
    assert overlay.size == (45, 30) and overlay.mode == "RGB"
    raw = np.load(out / ex["raw"])
    assert raw.dtype == np.float32 and raw.shape == (30, 45) and raw.min() >= 0 and raw.max() <= 1
    assert (out / "a.gradcam.png").is_file() and (out / "sub" / "a.gradcam.png").is_file()
    assert not list(out.rglob("*.part")), "no temporary files may remain"


def test_class_option_and_suffixes(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--class", "top2", "--class", "3", *TINY)
    assert r.exit_code == 0, r.output
    ex = load_summary(out)["images"][0]["explanations"]
    targets = [e["target"]["index"] for e in ex]
    assert targets[-1] == 3 or 3 in targets and len(targets) == len(set(targets))
    assert {e["overlay"] for e in ex} == {f"a.gradcam.{t}.png" for t in targets}


def test_json_flag_prints_summary_to_stdout(small_images: Path, tmp_path: Path) -> None:
    r = run("explain", small_images / "b.jpg", "--out", tmp_path / "o", "--json", *TINY)
    assert r.exit_code == 0
    assert json.loads(r.stdout)["images"][0]["status"] == "ok"


def test_config_file_merges_and_flags_win(small_images: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: toymodels:tiny_cnn\nmethod: gradcam\nalpha: 0.2\nlayer: features.1\nclass: [1]\nworkers: 0\n"
        f"out: {tmp_path / 'from-config'}\n"
    )
    r = run("explain", small_images / "a.png", "--config", cfg, "--alpha", "0.7", "-q")
    assert r.exit_code == 0, r.output
    s = load_summary(tmp_path / "from-config")
    assert s["options"]["alpha"] == 0.7  # the flag wins
    assert s["model"]["layer"] == "features.1"  # from the file
    assert s["options"]["class"] == ["1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: gradcam\n")
    r = run("explain", small_images / "a.png", "--config", bad)
    assert r.exit_code == 2 and "unknown key 'methd'" in r.output and "did you mean 'method'" in r.output


def test_corrupt_truncated_empty_and_non_image_files_give_exit_3(small_images: Path, tmp_path: Path, samples: Path) -> None:
    (small_images / "zero.jpg").write_bytes(b"")
    (small_images / "text.png").write_text("hello")
    data = (samples / "coffee.jpg").read_bytes()
    (small_images / "cut.jpg").write_bytes(data[: len(data) // 4])
    out = tmp_path / "o"
    r = run("explain", small_images, "--out", out, *TINY)
    assert r.exit_code == 3, r.output
    s = load_summary(out)
    status = {Path(im["path"]).name: im["status"] for im in s["images"]}
    assert status == {"a.png": "ok", "b.jpg": "ok", "zero.jpg": "error", "text.png": "error", "cut.jpg": "error"}
    errors = {Path(im["path"]).name: im["error"] for im in s["images"] if im["status"] == "error"}
    assert "empty file" in errors["zero.jpg"] and "not an image" in errors["text.png"]
    assert "truncated" in errors["cut.jpg"]
    assert (out / "a.gradcam.png").is_file() and (out / "b.gradcam.png").is_file()
    r = run("explain", small_images, "--out", tmp_path / "ff", "--fail-fast", *TINY)
    assert r.exit_code == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gradcm"], "unknown method 'gradcm'; did you mean 'gradcam'"),
        (["--layer", "features.9"], "unknown layer 'features.9'"),
        (["--class", "17"], "--class 17 is out of range: the model has 4 classes"),
        (["--class", "zebra"], "unknown class 'zebra'"),
        (["--colormap", "rainbw"], "unknown colormap 'rainbw'"),
        (["--alpha", "1.5"], "--alpha 1.5 is out of range"),
        (["--device", "tpu"], "--device 'tpu' is not one of"),
    ],
)
def test_usage_errors_exit_2_with_a_message(small_images: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images, "--out", out, *TINY, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (out / "summary.json").exists(), "usage errors are reported before any work"


def test_unknown_model_label_and_paths(small_images: Path, tmp_path: Path) -> None:
    r = run("explain", small_images, "--out", tmp_path / "o", "--model", "resnet5O")
    assert r.exit_code == 2 and "unknown model 'resnet5O'" in r.output and "did you mean" in r.output
    r = run("explain", small_images, "--out", tmp_path / "o", "--class", "egyptian catt", "-q")
    assert r.exit_code == 2 and "did you mean 'Egyptian cat'" in r.output.replace("\n", " ")
    r = run("explain", tmp_path / "nope.jpg", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no such file or folder" in r.output
    (tmp_path / "empty").mkdir()
    r = run("explain", tmp_path / "empty", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no images in folder" in r.output


def test_label_names_select_classes(small_images: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\n")
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--labels", labels, "--class", "Bird", *TINY)
    assert r.exit_code == 0, r.output
    t = load_summary(out)["images"][0]["explanations"][0]["target"]
    assert t["index"] == 2 and t["label"] == "bird"


def test_weights_file_that_does_not_fit(small_images: Path, tmp_path: Path) -> None:
    from torchvision.models import resnet18

    w = tmp_path / "r18.pth"
    torch.save(resnet18(num_classes=10).state_dict(), w)
    r = run("explain", small_images, "--out", tmp_path / "o", "--model", "resnet34", "--weights", w)
    assert r.exit_code == 2
    assert "does not fit architecture 'resnet34'" in r.output and "missing keys" in r.output
    # the same file fits resnet18 (10 classes inferred from the head)
    r = run("explain", small_images, "--out", tmp_path / "o2", "--model", "resnet18", "--weights", w, "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    s = load_summary(tmp_path / "o2")
    assert s["model"]["num_classes"] == 10 and s["model"]["layer"] == "layer4"
    import hashlib

    assert s["model"]["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()


def test_output_path_that_is_a_file(small_images: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    r = run("explain", small_images, "--out", f, *TINY)
    assert r.exit_code == 2 and "cannot be written" in r.output


def test_methods_layers_models_commands() -> None:
    r = run("methods")
    assert r.exit_code == 0 and "gradcam" in r.output
    r = run("methods", "--json")
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"gradcam", "gradcam++"} <= names
    r = run("layers", "--model", "toymodels:tiny_cnn")
    assert r.exit_code == 0 and "features.3" in r.output and "default" in r.output
    r = run("layers", "--model", "resnet18")
    assert r.exit_code == 0 and "layer4" in r.output
    r = run("models")
    assert r.exit_code == 0 and "efficientnet-lite0" in r.output


def test_version_and_help() -> None:
    assert "camcli" in run("--version").output
    r = run("explain", "--help")
    assert r.exit_code == 0 and "--method" in r.output and "--save-raw" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gradcam,"], "--method 'gradcam,' has an empty item"),
        (["--out", ""], "--out '' must not be empty"),
        (["--max-pixels", "0"], "--max-pixels 0 must be at least 1"),
    ],
)
def test_empty_items_and_bad_limits_exit_2(small_images: Path, args: list[str], message: str) -> None:
    r = run("explain", small_images, *TINY, *args)
    assert r.exit_code == 2 and message in r.output


def test_binary_config_file_exits_2(small_images: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(bytes(range(256)))
    r = run("explain", small_images, "--config", cfg, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a text file (expected UTF-8 YAML)" in r.output
