"""The bundled model on the real sample photos: right class, and the map lies on the object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from camcli.pipeline import ExplainOptions, run_explain as explain
from camcli.stats import energy_in_box

# Annotated by hand on sample_images/chelsea.jpg (451x300): cheek to cheek, brow to chin.
CAT_FACE = (80, 70, 380, 290)
CAT_CLASSES = {281, 282, 283, 284, 285, 286, 287}


def test_chelsea_is_a_cat_and_gradcam_lies_on_its_face(samples: Path, tmp_path: Path, bundled) -> None:  # noqa: ANN001
    res = explain([samples / "chelsea.jpg"], ExplainOptions(out=str(tmp_path), save_raw=True, workers=0), model=bundled)
    assert res.exit_code == 0
    im = res.images[0]
    assert im["predictions"][0]["index"] in CAT_CLASSES
    cam = np.load(tmp_path / im["explanations"][0]["raw"])
    assert cam.shape == (300, 451)
    share = energy_in_box(cam, CAT_FACE)
    area = (CAT_FACE[2] - CAT_FACE[0]) * (CAT_FACE[3] - CAT_FACE[1]) / cam.size
    assert share > 0.5, f"only {share:.2f} of the Grad-CAM energy is on the cat's face"
    assert share > area, "the map must be denser on the face than elsewhere"
    px, py = im["explanations"][0]["stats"]["peak"]
    assert CAT_FACE[0] <= px < CAT_FACE[2] and CAT_FACE[1] <= py < CAT_FACE[3]


def test_sample_folder_classes(samples: Path, tmp_path: Path, bundled) -> None:  # noqa: ANN001
    res = explain([samples], ExplainOptions(out=str(tmp_path), workers=2), model=bundled)
    assert res.exit_code == 0
    top = {Path(im["path"]).name: im["predictions"][0]["index"] for im in res.images}
    assert top["coffee.jpg"] in {967, 968}
    assert top["rocket.jpg"] in {657, 744}
    assert json.loads((tmp_path / "summary.json").read_text())["counts"]["ok"] == 4
