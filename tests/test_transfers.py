"""Device discipline: the host reads a batch through one packed copy, not value by value.

Each conversion of a device tensor to Python or numpy (``.item()``, ``.tolist()``, ``float(t)``,
``int(t)``, ``bool(t)``, ``.cpu()``, ``.numpy()``) waits for the device. These tests count them for
4 and for 16 images; the count may not grow with the batch (at most 0.25 more per extra image).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from camcli.engine import CamEngine, EngineConfig
from camcli.hostcopy import HostPack
from camcli.methods import MethodOptions, get_method
from camcli.targets import ClassIndex, TopK

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
PER_EXTRA_IMAGE = 0.25


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[[], object]], int]]:
    """count(fn) -> how many tensor-to-host conversions ``fn`` made (every thread counts)."""
    counts: Counter[str] = Counter()
    for name in CONVERSIONS:
        real = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: object, _real=real, _name=name, **kwargs: object) -> object:  # noqa: ANN001
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def count(fn: Callable[[], object]) -> int:
        counts.clear()
        fn()
        return sum(counts.values())

    yield count


class Saturating(nn.Module):
    """Two conv layers, a ReLU, a Tanh after the target layer (so saturation is measured), GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.squash = nn.Tanh()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.squash(self.c2(self.act(self.c1(x)))).mean(dim=(2, 3)))


def test_hostpack_round_trips_every_dtype() -> None:
    pack = HostPack()
    parts = [torch.randn(3, 5), torch.tensor([True, False, True]), torch.arange(7), torch.randn(2).half(),
             torch.tensor([1, 2], dtype=torch.uint8), torch.zeros(0),
             torch.arange(6).reshape(2, 3)[:, 1], torch.arange(3).reshape(1, 3)[:, 2]]  # strided columns
    handles = [pack.add(t) for t in parts]
    got = pack.fetch()
    for t, h in zip(parts, handles):
        expected = t.float() if t.dtype == torch.float16 else t
        assert got[h].shape == tuple(t.shape)
        np.testing.assert_array_equal(got[h], expected.numpy())


@pytest.mark.parametrize(
    "methods,kwargs",
    [
        ("gradcam,gradcam++,layercam,eigencam", {}),
        ("gradcam,activations", {"per_layer": True, "layers": ["c1", "c2"]}),
        ("gradcam,xgradcam", {"aug_smooth": True, "signed": True}),
        ("scorecam,ablationcam,ss-cam", {"options": MethodOptions(score_channels=2, samples=2)}),
    ],
    ids=["gradient-family", "layers-and-channels", "aug-smooth", "perturbation"],
)
def test_engine_conversions_do_not_grow_with_the_batch(
    conversions: Callable[[Callable[[], object]], int], methods: str, kwargs: dict
) -> None:
    model = Saturating().eval()
    layers = kwargs.pop("layers", ["c2"])
    opts = kwargs.pop("options", MethodOptions(channels="top2"))
    engine = CamEngine(model, EngineConfig(layers, [get_method(m) for m in methods.split(",")], options=opts, **kwargs))
    specs = [TopK(2), ClassIndex(1)]
    small, big = torch.randn(4, 3, 24, 32), torch.randn(16, 3, 24, 32)
    outs: dict[int, list] = {}
    n4 = conversions(lambda: outs.setdefault(4, engine.maps(small, specs)))
    n16 = conversions(lambda: outs.setdefault(16, engine.maps(big, specs)))
    assert (n16 - n4) / 12 <= PER_EXTRA_IMAGE, f"{n4} conversions for 4 images, {n16} for 16"
    # the outputs are complete: every image has its maps, predictions and saturation record
    for o in outs[16]:
        assert o.maps and len(o.top) == 5 and o.saturation is not None
        assert all(isinstance(m.cam, np.ndarray) for m in o.maps)


def test_explain_conversions_do_not_grow_with_the_images(
    conversions: Callable[[Callable[[], object]], int], tmp_path: Path
) -> None:
    from camcli.models import load_model
    from camcli.options import ExplainOptions
    from camcli.pipeline import run_explain as explain

    rng = np.random.default_rng(0)
    for n in (4, 16):
        d = tmp_path / f"in{n}"
        d.mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    lm = load_model("toymodels:tiny_cnn")
    counts = {}
    for n in (4, 16):
        opts = ExplainOptions(out=str(tmp_path / f"out{n}"), method="gradcam,gradcam++", classes=["top2"], batch_size=16,
                              workers=0, quiet=True)
        counts[n] = conversions(lambda: explain([tmp_path / f"in{n}"], opts, model=lm))
        assert len(list((tmp_path / f"out{n}").glob("*.png"))) == 4 * n
    assert (counts[16] - counts[4]) / 12 <= PER_EXTRA_IMAGE, counts


def test_segmentation_conversions_do_not_grow_with_the_batch(conversions: Callable[[Callable[[], object]], int]) -> None:
    """A region target's score and pixel share travel in the pack too (no float() of a mask per image)."""
    from camcli.options import ExplainOptions
    from camcli.session import Session

    sess = Session.open(ExplainOptions(model="toymodels:tiny_seg", layer="features", method="gradcam,hirescam",
                                       quiet=True))
    specs = [TopK(2)]
    small, big = torch.randn(4, 3, 24, 32), torch.randn(16, 3, 24, 32)
    outs: dict[int, list] = {}
    n4 = conversions(lambda: outs.setdefault(4, sess.engine.maps(small, specs)))
    n16 = conversions(lambda: outs.setdefault(16, sess.engine.maps(big, specs)))
    assert (n16 - n4) / 12 <= PER_EXTRA_IMAGE, f"{n4} conversions for 4 images, {n16} for 16"
    for o in outs[16]:
        shares = dict(o.top)
        for m in o.maps:  # the region is the pixels each image's class wins: its share is that class's share
            assert m.region["kind"] == "predicted"
            assert m.region["share"] == pytest.approx(shares[m.target], abs=1e-6)
