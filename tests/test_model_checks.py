"""Models that break the engine's assumptions are refused at load, in one line, not once per image
(issue 23.8): a layer whose module runs twice in one forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.errors import UsageError
from camcli.options import ExplainOptions
from camcli.session import Session

runner = CliRunner()


class SharedTwice(nn.Module):
    """stem -> block -> block (the same module twice) -> pool -> linear: both calls feed the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.block(self.stem(x))).mean(dim=(2, 3)))


class DictOtherCall(nn.Module):
    """A dict output; ``shared`` runs on the image for the logits, then on a blurred copy for "aux":
    its last call (the one a tap keeps) reaches the logits through no path at all."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.fc(self.shared(x).mean(dim=(2, 3)))
        aux = self.shared(nn.functional.avg_pool2d(x, 3, 1, 1)).mean(dim=(1, 2, 3))
        return {"logits": logits, "aux": aux}


def shared_twice() -> nn.Module:
    torch.manual_seed(0)
    return SharedTwice()


def dict_other_call() -> nn.Module:
    torch.manual_seed(0)
    return DictOtherCall()


@pytest.mark.parametrize(("model", "layer"), [("shared_twice", "block"), ("dict_other_call", "shared")])
def test_a_layer_called_twice_is_refused_at_open(model: str, layer: str) -> None:
    with pytest.raises(UsageError, match=rf"layer '{layer}' runs 2 times in one forward pass"):
        Session.open(ExplainOptions(model=f"test_model_checks:{model}", layer=layer, image_size=32, quiet=True))


def test_the_refusal_holds_without_the_load_time_probe() -> None:
    """A second session on a loaded model has no probe left: it traces the model itself."""
    first = Session.open(ExplainOptions(model="test_model_checks:shared_twice", layer="stem", image_size=32, quiet=True))
    with pytest.raises(UsageError, match="runs 2 times"):
        Session.open(ExplainOptions(model="test_model_checks:shared_twice", layer="block", image_size=32, quiet=True),
                     model=first.model)


def test_the_default_layer_passes_over_modules_called_twice() -> None:
    s = Session.open(ExplainOptions(model="test_model_checks:shared_twice", image_size=32, quiet=True))
    assert s.layers == ["stem"]  # block and its children finish later, but twice each
    out = s.engine.maps(torch.rand(1, 3, 32, 32), s.specs)[0]
    assert out.maps[0].cam.shape == (16, 16)


def test_cli_says_so_in_one_line_before_any_image(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 3)
    r = runner.invoke(app, ["explain", str(folder), "--model", "test_model_checks:dict_other_call",
                            "--layer", "shared", "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 2, r.output
    assert "runs 2 times" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "records.jsonl").exists()  # not one failed record per image
