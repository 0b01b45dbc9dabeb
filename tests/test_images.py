"""Discovery and decoding: every input type and pixel mode the issue names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camcli.errors import ImageError, UsageError
from camcli.images import Preprocess, decode, discover
from camcli.run import output_stems


def _save(img: Image.Image, path: Path, **kw) -> Path:  # noqa: ANN003
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("ext", ["jpg", "png", "bmp", "tiff", "webp"])
def test_decodes_each_format(tmp_path: Path, ext: str) -> None:
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = (200, 30, 10)
    p = _save(Image.fromarray(arr), tmp_path / f"x.{ext}")
    out = decode(p)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert abs(int(out[10, 5, 0]) - 200) < 12 and abs(int(out[10, 25, 0])) < 12


def test_pixel_modes(tmp_path: Path) -> None:
    grey = _save(Image.fromarray(np.full((8, 9), 77, np.uint8), "L"), tmp_path / "g.png")
    assert (decode(grey) == 77).all()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 4:, 3] = 255  # left half transparent -> composited onto white
    out = decode(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 7]) == (255, 0, 0)
    pal = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    assert decode(_save(pal, tmp_path / "p.png")).shape == (8, 8, 3)
    sixteen = Image.fromarray(np.full((6, 6), 65535, np.uint16))
    out16 = decode(_save(sixteen, tmp_path / "s16.png"))
    assert (out16 == 255).all(), "16-bit white must map to 8-bit white, not clip or wrap"
    cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))  # pure red in CMYK
    out_cmyk = decode(_save(cmyk, tmp_path / "c.jpg"))
    assert out_cmyk.shape == (4, 5, 3) and out_cmyk[2, 2, 0] > 200 and out_cmyk[2, 2, 1] < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes())
    assert decode(p).shape == (40, 20, 3)


@pytest.mark.parametrize(
    "content,msg",
    [(b"", "empty file"), (b"this is text, not a picture", "not an image")],
)
def test_bad_files_raise_image_error(tmp_path: Path, content: bytes, msg: str) -> None:
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=msg):
        decode(p)


def test_truncated_file_raises_image_error(tmp_path: Path, samples: Path) -> None:
    data = (samples / "coffee.jpg").read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode(p)


def test_discover_folder_recursive_glob_and_errors(small_images: Path, tmp_path: Path) -> None:
    (small_images / "notes.txt").write_text("not an image, ignored in folders")
    flat = discover([small_images])
    assert [s.rel.as_posix() for s in flat] == ["a.png", "b.jpg"]
    deep = discover([small_images], recursive=True)
    assert [s.rel.as_posix() for s in deep] == ["a.png", "b.jpg", "sub/a.png"]
    globbed = discover([str(small_images / "*.png")])
    assert [s.rel.as_posix() for s in globbed] == ["a.png"]
    with pytest.raises(UsageError, match="no such file or folder"):
        discover([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images in folder"):
        discover([tmp_path / "empty"])
    with pytest.raises(UsageError, match="no images match"):
        discover([str(tmp_path / "*.gif")])


def test_discover_skips_output_folder(small_images: Path) -> None:
    out = small_images / "camcli-out"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "a.gradcam.png")
    rels = [s.rel.as_posix() for s in discover([small_images], recursive=True, exclude=out)]
    assert "camcli-out/a.gradcam.png" not in rels and len(rels) == 3


def test_output_stems_never_collide(tmp_path: Path) -> None:
    for name in ("x/a.jpg", "y/a.jpg", "x/a.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    stems = output_stems(discover([tmp_path / "x", tmp_path / "y"]))
    assert sorted(s.as_posix() for s in stems) == ["x/a.jpg", "x/a.png", "y/a"]


def test_preprocess_keeps_aspect_ratio_or_uses_fixed_size() -> None:
    rgb = np.zeros((300, 451, 3), np.uint8)
    flex = Preprocess(224, (0.5,) * 3, (0.5,) * 3, flexible=True)
    assert tuple(flex(rgb).shape) == (3, 224, 337)
    assert tuple(flex(np.zeros((500, 100, 3), np.uint8)).shape) == (3, 1120, 224)
    fixed = Preprocess(224, (0.5,) * 3, (0.5,) * 3, flexible=False)
    assert tuple(fixed(rgb).shape) == (3, 224, 224)
    assert float(flex(rgb).min()) == pytest.approx(-1.0)


# -- bounded decoding, odd entries, links, frames -------------------------------------------------
def test_strip_conversion_matches_whole_image_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import camcli.images as I

    rng = np.random.default_rng(0)
    images = {
        "rgba.png": Image.fromarray(rng.integers(0, 255, (37, 23, 4), dtype=np.uint8), "RGBA"),
        "p.png": Image.fromarray(rng.integers(0, 255, (37, 23), dtype=np.uint8)).convert("P"),
        "s16.png": Image.fromarray(rng.integers(0, 65535, (37, 23), dtype=np.uint16)),
        "f.tiff": Image.fromarray(rng.normal(size=(37, 23)).astype(np.float32), "F"),
        "cmyk.jpg": Image.fromarray(rng.integers(0, 255, (37, 23, 3), dtype=np.uint8)).convert("CMYK"),
        "grey.png": Image.fromarray(rng.integers(0, 255, (37, 23), dtype=np.uint8), "L"),
    }
    for name, img in images.items():
        p = _save(img, tmp_path / name)
        whole = decode(p)
        monkeypatch.setattr(I, "STRIP_PIXELS", 23 * 5)  # strips of 5 rows; the range is the image's
        strips = decode(p)
        monkeypatch.undo()
        assert strips.flags.writeable and whole.flags.writeable
        np.testing.assert_array_equal(strips, whole, err_msg=name)


def test_max_pixels_is_checked_from_the_header(tmp_path: Path) -> None:
    from camcli.images import image_size, read_image

    p = _save(Image.new("RGB", (300, 200)), tmp_path / "x.png")
    assert read_image(p, max_pixels=60_000).rgb.shape == (200, 300, 3)
    with pytest.raises(ImageError, match=r"300x200 is 60,000 pixels, more than --max-pixels 59,999"):
        read_image(p, max_pixels=59_999)
    with pytest.raises(ImageError, match="raise --max-pixels"):
        image_size(p, max_pixels=100)


def test_fifo_and_broken_link_named_on_the_command_line_are_per_image_errors(small_images: Path, tmp_path: Path) -> None:
    from camcli.options import ExplainOptions
    from camcli.pipeline import run_explain as explain

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    broken = tmp_path / "gone.jpg"
    broken.symlink_to(tmp_path / "nowhere.jpg")
    res = explain([fifo, broken, small_images / "a.png"],
                  ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "o"), workers=0, quiet=True))
    status = {Path(im["path"]).name: (im["status"], im["error"]) for im in res.images}
    assert res.exit_code == 3 and status["a.png"] == ("ok", None)
    assert "named pipe (FIFO)" in status["pipe.png"][1] and "broken symbolic link" in status["gone.jpg"][1]


def test_fifos_and_broken_links_in_folders_are_skipped_and_counted(small_images: Path, tmp_path: Path) -> None:
    from camcli.options import ExplainOptions
    from camcli.pipeline import run_explain as explain

    os.mkfifo(small_images / "pipe.png")
    (small_images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    res = explain([small_images], ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "o"), quiet=True))
    assert res.exit_code == 0
    assert res.summary["counts"]["images"] == 2 and res.summary["counts"]["skipped_entries"] == 2


def test_outputs_follow_the_links_name_not_its_target(tmp_path: Path) -> None:
    from camcli.options import ExplainOptions
    from camcli.pipeline import run_explain as explain

    store = tmp_path / "store" / "deep"
    store.mkdir(parents=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(store / "real.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (30, 20)).save(photos / "a.png")
    (photos / "cat.png").symlink_to(store / "real.png")
    assert [s.rel.as_posix() for s in discover([photos])] == ["a.png", "cat.png"]
    out = tmp_path / "o"
    res = explain([photos], ExplainOptions(model="toymodels:tiny_cnn", out=str(out), quiet=True))
    assert res.exit_code == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.gradcam.png", "cat.gradcam.png"]


def test_animated_and_multipage_images_say_the_first_frame_was_used(tmp_path: Path, small_images: Path) -> None:
    from typer.testing import CliRunner

    from camcli.cli import app

    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(small_images / "anim.webp", save_all=True, append_images=frames[1:])
    frames[0].save(small_images / "pages.tiff", save_all=True, append_images=frames[1:2])
    args = ["explain", str(small_images), "--model", "toymodels:tiny_cnn", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("only the first was used") == 1  # warned once per run
    from camcli.records import load_run

    notes = {Path(im["path"]).name: im.get("note") for im in load_run(tmp_path / "o")["images"]}
    assert "3 frames" in notes["anim.webp"] and "2 frames" in notes["pages.tiff"] and notes["a.png"] is None
    assert CliRunner().invoke(app, [*args, "-q"]).stderr == ""


def test_huge_images_are_decoded_reduced_when_only_a_model_input_is_needed(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    import camcli.images as I

    yy, xx = np.mgrid[0:300, 0:400]
    arr = np.stack([xx * 255 // 399, yy * 255 // 299, (xx + yy) % 256], axis=2).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 300 wide, 400 high
    files = {"x.jpg": {}, "x.png": {}, "turned.jpg": {"exif": exif.tobytes()}}
    monkeypatch.setattr(I, "REDUCE_ABOVE", 1000)  # as if these 120,000 pixels were a huge scan
    for name, kw in files.items():
        p = _save(Image.fromarray(arr), tmp_path / name, **kw)
        full = I.read_image(p)
        small = I.read_image(p, fit=lambda h, w: (h // 4, w // 4))
        assert small.size == full.rgb.shape[:2] == ((400, 300) if kw else (300, 400))
        assert small.rgb.shape[:2] == (full.rgb.shape[0] // 4, full.rgb.shape[1] // 4)  # draft 1/4 or reduce(4)
        ref = cv2.resize(full.rgb, small.rgb.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(ref.astype(int) - small.rgb).mean() < 4, name
    monkeypatch.undo()
    assert I.read_image(tmp_path / "x.jpg", fit=lambda h, w: (h // 4, w // 4)).rgb.shape == (300, 400, 3)


def test_evaluate_skips_and_counts_fifos_and_broken_links_in_folders(small_images: Path, tmp_path: Path) -> None:

    from camcli.evaluate import evaluate
    from camcli.options import EvaluateOptions

    os.mkfifo(small_images / "pipe.png")
    (small_images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    res = evaluate([small_images], EvaluateOptions(model="toymodels:tiny_cnn", method="gradcam", metric="deletion_auc",
                                                   steps=4, out=str(tmp_path / "o"), quiet=True), model=None)
    doc = json.loads((tmp_path / "o" / "evaluation.json").read_text())
    assert res.exit_code == 0 and doc["counts"]["images"] == 2 and doc["skipped_entries"] == 2
