"""Bounded resources and interruptions, through the installed command in a child process:
a huge image, peak memory, Ctrl-C once and twice."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import noise_images

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def grey_png(path: Path, width: int, height: int, value: int = 128, lower: int | None = None) -> Path:
    """A constant grey PNG of any size (``lower``: another grey for the lower half, from a row that is
    a multiple of 500), streamed: the test never holds the decoded image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    body = []
    for y in range(0, height, 500):
        grey = value if lower is None or y < height // 2 else lower
        block = (b"\x00" + bytes([grey]) * width) * 500
        body.append(z.compress(block if height - y >= 500 else block[: (height - y) * (width + 1)]))
    body.append(z.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


def camcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "camcli", *args]


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_measured(args: list[str], cwd: Path) -> tuple[int, float, str]:
    """(exit code, peak resident memory in GiB, stderr) of one child process, measured by a
    fresh parent whose only child it is."""
    probe = (
        "import resource, subprocess, sys, json\n"
        f"r = subprocess.run({args!r}, capture_output=True, text=True)\n"
        "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stderr]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd, env=child_env(),
                         timeout=600)
    rc, kib, err = json.loads(out.stdout)
    return rc, kib / 2**20, err


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grey_png(tmp_path_factory.mktemp("huge") / "grey.png", 16000, 16000)


def test_huge_image_is_refused_by_default_with_its_size(huge_png: Path, tmp_path: Path) -> None:
    from camcli.options import ExplainOptions
    from camcli.pipeline import run_explain as explain

    assert huge_png.stat().st_size < 2_000_000  # 256 Mpx that compress to almost nothing: a bomb
    res = explain([huge_png], ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "o"), quiet=True))
    (im,) = res.images
    assert res.exit_code == 3 and im["status"] == "error"
    assert "16000x16000" in im["error"] and "256,000,000 pixels" in im["error"] and "--max-pixels" in im["error"]


def test_huge_image_is_explained_in_bounded_memory(huge_png: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    rc, peak_gib, err = run_measured(
        camcli("explain", str(huge_png), "--model", "toymodels:tiny_cnn", "--max-pixels", "300000000",
               "--out", str(out), "-q"), cwd=tmp_path)
    assert rc == 0, err
    assert peak_gib < 4.0, f"peak resident memory {peak_gib:.2f} GiB"
    from camcli.records import load_run

    assert load_run(out)["images"][0]["status"] == "ok"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # this test's own read of a 256 Mpx overlay
    with Image.open(out / "grey.gradcam.png") as im:  # the header only
        assert im.size == (16000, 16000)


def test_check_on_a_huge_image_measures_its_rules_in_bounded_memory(tmp_path: Path) -> None:
    """Region energy, peak and baseline similarity at 16000 x 16000 are measured a band at a time
    (camcli/fullmap.py): a full-resolution float map, its float64 copies and the loaded baseline
    took over 8 GB."""
    import json

    import yaml

    image = grey_png(tmp_path / "two.png", 16000, 16000, 230, lower=20)  # a map with an edge to find
    doc = {"model": "toymodels:tiny_cnn", "max_pixels": 300_000_000, "baselines": "base",
           "cases": [{"image": str(image), "expect": {"region": [0, 0, 16000, 16000], "min_energy_in_region": 0.99,
                                                       "peak_in_region": True, "min_baseline_similarity": 0.99}}]}
    f = tmp_path / "check.yaml"
    f.write_text(yaml.safe_dump(doc))
    rc, _, err = run_measured(camcli("check", str(f), "--update-baselines"), cwd=tmp_path)
    assert rc == 0, err
    assert (tmp_path / "base" / "000-two.gradcam.npy").stat().st_size > 16000 * 16000 * 4  # full resolution
    rc, peak_gib, err = run_measured(camcli("check", str(f), "--out", str(tmp_path / "report"), "--json",
                                            str(tmp_path / "report.json")), cwd=tmp_path)
    assert rc == 0, err
    rules = {r["rule"]: r["value"] for r in json.loads((tmp_path / "report.json").read_text())["rules"]}
    # the whole image is the region; the map is its own baseline
    assert rules == {"min_energy_in_region": 1.0, "peak_in_region": True, "min_baseline_similarity": 1.0}
    assert (tmp_path / "report" / "000-two.gradcam.png").is_file()
    assert peak_gib < 3.5, f"peak resident memory {peak_gib:.2f} GiB"


def test_reading_with_camcli_leaves_pillows_own_limit_in_place(huge_png: Path) -> None:
    """camcli lifts Pillow's decompression-bomb limit only while it reads (it checks --max-pixels
    itself): a program that imports camcli keeps Pillow's protection for its own reads."""
    import camcli.images as I

    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    assert I.image_size(huge_png, 300_000_000) == (16000, 16000)
    with pytest.raises(I.ImageError, match="--max-pixels"):
        I.image_size(huge_png)  # camcli's own refusal, with the way out
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(Image.DecompressionBombError):
        Image.open(huge_png)


def _interrupt(tmp_path: Path, folder: Path, workers: str, second_after: float | None) -> tuple[int, str, int]:
    """Start explain on a slow model, Ctrl-C the process group once a batch runs (and again)."""
    marker = tmp_path / "started"
    p = subprocess.Popen(
        camcli("explain", str(folder), "--model", "toymodels:slow_cnn", "--workers", workers,
               "--out", str(tmp_path / "out"), "-q"),
        env=child_env(CAMCLI_TEST_STARTED=str(marker)), cwd=tmp_path, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        while not marker.exists() and p.poll() is None:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)  # as a terminal does: to every process of the group
        if second_after is not None:
            time.sleep(second_after)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err, p.pid


@pytest.fixture
def many(tmp_path: Path) -> Path:
    return noise_images(tmp_path / "many", [(40, 60)] * 40)


@pytest.mark.parametrize("workers,second_after", [("2", None), ("2", 0.1)], ids=["once", "twice"])
def test_ctrl_c_exits_130_without_a_traceback(tmp_path: Path, many: Path, workers: str,
                                               second_after: float | None) -> None:
    rc, err, group = _interrupt(tmp_path, many, workers, second_after)
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted" in err
    if second_after is None:  # an orderly stop: the decoding workers were stopped, not left behind
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)


# -- the pieces that keep memory flat, in process -------------------------------------------------
@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_banded_rendering_matches_the_whole_image_functions(deflate: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import cv2

    import camcli.render as R
    from camcli.render import encode_png, overlay, overlay_png, raw_npy, resolve_colormap, upsample

    if deflate == "zlib":  # the fallback where the isal package is missing
        monkeypatch.setattr(R, "_isal", None)
    assert (R._isal is not None) == (deflate == "isal")

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (301, 457, 3), dtype=np.uint8)
    cam = rng.random((7, 11)).astype(np.float32)
    for cmap, signed in ((resolve_colormap("jet"), False), (resolve_colormap("diverging"), True)):
        mine = overlay_png(rgb, cam * 2 - 1 if signed else cam, cmap, 0.4, signed)
        ref = encode_png(overlay(rgb, upsample(cam * 2 - 1 if signed else cam, 301, 457), cmap, 0.4, signed))
        a = cv2.imdecode(np.frombuffer(mine, np.uint8), cv2.IMREAD_COLOR).astype(int)
        b = cv2.imdecode(np.frombuffer(ref, np.uint8), cv2.IMREAD_COLOR).astype(int)
        assert np.abs(a - b).max() <= 2 and (a != b).mean() < 1e-3  # float rounding at a few pixels
        drawn = R.overlay_image(rgb, cam * 2 - 1 if signed else cam, cmap, 0.4, signed).astype(int)  # check's
        assert np.abs(drawn - b).max() <= 2 and (drawn != b).mean() < 1e-3
        with Image.open(io.BytesIO(mine)) as im:
            assert im.size == (457, 301) and im.mode == "RGB"
    raw = np.load(io.BytesIO(bytes(raw_npy(cam, 301, 457))))
    assert raw.dtype == np.float32 and np.abs(raw - upsample(cam, 301, 457)).max() < 1e-5


def test_map_statistics_of_large_images_are_measured_at_a_bounded_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import camcli.stats as S
    from camcli.render import upsample

    cam = np.zeros((8, 8), np.float32)
    cam[2, 5] = 1.0
    exact = S.map_stats(upsample(cam, 600, 800))
    assert S.image_map_stats(cam, 600, 800) == exact  # below the bound: the full-resolution numbers
    monkeypatch.setattr(S, "STATS_MAX_PIXELS", 600 * 800 // 16)  # measured at 150 x 200
    scaled = S.image_map_stats(cam, 600, 800)
    assert np.abs(np.subtract(scaled["peak"], exact["peak"])).max() <= 4
    assert np.abs(np.subtract(scaled["centroid"], exact["centroid"])).max() <= 2
    assert np.abs(np.subtract(scaled["bbox"], exact["bbox"])).max() <= 4
    assert scaled["top10_energy_share"] == pytest.approx(exact["top10_energy_share"], abs=0.01)


def test_batches_stay_within_the_pixel_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import camcli.local_runner as local_runner
    import camcli.pipeline as P
    from camcli.session import Session

    folder = noise_images(tmp_path / "imgs", [(40, 40)] * 9, seed=1)
    seen: list[int] = []
    real = Session.explain_images

    def spy(self: Session, batch: object, specs: object = None, sizes: object = None) -> object:
        seen.append(len(batch))  # type: ignore[arg-type]
        return real(self, batch, specs, sizes)  # type: ignore[arg-type]

    monkeypatch.setattr(Session, "explain_images", spy)

    def run(out: str) -> dict[str, np.ndarray]:
        P.run_explain([folder], P.ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / out), save_raw=True,
                                             workers=0, quiet=True))
        return {p.name: np.load(p) for p in (tmp_path / out).glob("*.npy")}

    free = run("free")
    assert max(seen) == 8
    seen.clear()
    monkeypatch.setattr(local_runner, "PIXEL_BUDGET", 2 * 1600)  # two 40x40 images
    budgeted = run("budget")
    assert max(seen) == 2 and sum(seen) == 9
    assert free.keys() == budgeted.keys() and all(np.array_equal(free[k], budgeted[k]) for k in free)
