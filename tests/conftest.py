from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_images"


def noise_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, name: str = "{:02d}.png") -> Path:
    """A folder of random RGB images, one per (height, width), named name.format(i)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name.format(i))
    return folder


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def bundled():
    """The bundled EfficientNet-Lite0, loaded once for the whole session."""
    from camcli.models import load_model

    return load_model()


@pytest.fixture
def small_images(tmp_path: Path) -> Path:
    """A folder with two small RGB images of different sizes and a nested one."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(d / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(d / "sub" / "a.png")
    return d


SIZES = ((32, 48), (40, 40), (48, 32))  # (h, w): three input shapes, so runs batch by shape


@pytest.fixture
def make_images(tmp_path: Path):  # noqa: ANN201
    """make_images(name, n, seed=1, sub=0, broken=False): a folder of n small random PNGs named
    img00.png ... (every ``sub``-th in ``sub/``), plus an unreadable broken.png if asked."""

    def make(name: str, n: int, *, seed: int = 1, sub: int = 0, broken: bool = False) -> Path:
        d = noise_images(tmp_path / name, [SIZES[i % len(SIZES)] for i in range(n)], seed, "img{:02d}.png")
        if sub:
            (d / "sub").mkdir()
            for i in range(0, n, sub):
                (d / f"img{i:02d}.png").rename(d / "sub" / f"img{i:02d}.png")
        if broken:
            (d / "broken.png").write_text("not an image")
        return d

    return make


@pytest.fixture
def chelsea_copy(tmp_path: Path) -> Path:
    d = tmp_path / "cat"
    d.mkdir()
    shutil.copy(SAMPLES / "chelsea.jpg", d / "chelsea.jpg")
    return d / "chelsea.jpg"
