"""How the engine is built and what it lends: one config, unfit methods dropped before it is built,
hints carried as attributes, and capabilities built once, only when a method reads them."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch

from camcli import engine as engine_module
from camcli.engine import CamEngine, EngineConfig, fitting, unfit
from camcli.errors import UsageError
from camcli.methods import CamInputs, MethodInfo, MethodOptions, get_method
from camcli.options import ExplainOptions
from camcli.session import Session
from camcli.targets import ClassIndex
from toymodels import DictOut, TinyCNN

ROOT = Path(__file__).resolve().parents[1]


def _model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_config_is_checked_when_built_and_an_engine_on_another_module_shares_it() -> None:
    with pytest.raises(UsageError, match="no target layer"):
        EngineConfig([], [get_method("gradcam")])
    with pytest.raises(UsageError, match="no method"):
        EngineConfig(["features"], [])
    with pytest.raises(UsageError, match="precision 'fp8' is not one of fp32, bf16, fp16"):
        EngineConfig(["features"], [get_method("gradcam")], precision="fp8")
    config = EngineConfig(["features"], [get_method("gradcam")], options=MethodOptions(seed=3))
    a, b = CamEngine(_model(), config), CamEngine(_model(), config)
    assert a.config is b.config and a.options.seed == 3 and a.layers == ["features"]


def test_unfit_methods_are_named_and_dropped_before_the_engine_is_built() -> None:
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    # features.0 (the first conv) does not feed global-average-pool -> linear: CAM cannot work there.
    config = EngineConfig(["features.0"], [get_method("gradcam"), get_method("cam")])
    reasons = unfit(model, config, x)
    assert reasons == {"cam": "the layer does not feed global-average-pool -> linear directly"}
    kept = fitting(config, reasons)
    assert [m.name for m in kept.methods] == ["gradcam"] and kept.layers == ("features.0",)
    CamEngine(model, kept).check(x)  # what is left passes the engine's own checks
    assert unfit(model, EngineConfig(["features"], config.methods), x) == {}


def test_a_layer_hint_travels_as_an_attribute() -> None:
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UsageError) as info:
        CamEngine(_model(), EngineConfig(["features.0"], [get_method("cam")])).check(x)
    assert info.value.layer_hint and "global-average-pool" in str(info.value)
    with pytest.raises(UsageError) as info:
        CamEngine(_model(), EngineConfig(["features"], [get_method("activations")],
                                         options=MethodOptions(channels="9"))).check(x)
    assert info.value.layer_hint  # a method's own check of its options against the layer
    with pytest.raises(UsageError) as info:
        CamEngine(DictOut().eval(), EngineConfig(["net.features"], [get_method("gradcam")], output_key="nope")).check(x)
    assert "--output-key 'nope'" in str(info.value) and not info.value.layer_hint  # another layer would not help


def test_the_session_adds_where_to_look_only_to_errors_marked_with_the_hint() -> None:
    with pytest.raises(UsageError) as info:
        Session.open(ExplainOptions(model="toymodels:tiny_cnn", method="cam", layer="features.0", quiet=True))
    assert str(info.value).endswith("(see `camcli layers --model toymodels:tiny_cnn`)")
    assert str(info.value).count("camcli layers") == 1


def _counting_lender(calls: list[tuple[str, str]]) -> Any:  # noqa: ANN401
    class Lender:
        def lend(self, what: str, layer: str) -> Any:  # noqa: ANN401
            calls.append((what, layer))
            return lambda inputs, image_index: torch.zeros(inputs.shape[0])

    return Lender()


def test_caminputs_builds_a_capability_on_first_read_only_and_caches_it() -> None:
    calls: list[tuple[str, str]] = []
    scorecam = get_method("scorecam")
    inputs = CamInputs(torch.zeros(1, 2, 3, 3), torch.tensor([0]), method=scorecam, layer="l",
                       lender=_counting_lender(calls))
    assert calls == []  # nothing built until read
    first = inputs.scorer
    assert inputs.scorer is first and calls == [("scorer", "l")]


def test_reading_an_undeclared_capability_is_a_bug_in_the_method() -> None:
    calls: list[tuple[str, str]] = []
    inputs = CamInputs(torch.zeros(1, 2, 3, 3), torch.tensor([0]), method=get_method("gradcam"), layer="l",
                       lender=_counting_lender(calls))
    with pytest.raises(RuntimeError, match="method 'gradcam' reads scorer but does not declare needs_scorer=True"):
        inputs.scorer
    assert calls == []
    with pytest.raises(RuntimeError, match="engine bug: a method needs gradients but none was given"):
        CamInputs(torch.zeros(1, 2, 3, 3), torch.tensor([0])).gradients
    with pytest.raises(TypeError, match="unknown capabilities \\['gradient'\\]"):
        CamInputs(torch.zeros(1, 2, 3, 3), torch.tensor([0]), gradient=torch.zeros(1))


def test_gradients_are_taken_once_per_target_and_only_when_a_method_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    grads = []
    real = torch.autograd.grad

    def counting(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        grads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module.torch.autograd, "grad", counting)

    def lazy(inputs: CamInputs) -> torch.Tensor:  # declares gradients but never reads them
        return inputs.activations.sum(dim=1)

    x = torch.randn(2, 3, 32, 32)
    silent = MethodInfo("silent", lazy, "", "", needs_gradients=True)
    CamEngine(_model(), EngineConfig(["features"], [silent])).maps(x, [ClassIndex(0)])
    assert grads == []
    two = [get_method("gradcam"), get_method("gradcam++")]  # both read the same target's gradients
    CamEngine(_model(), EngineConfig(["features"], two)).maps(x, [ClassIndex(0), ClassIndex(1)])
    assert len(grads) == 2  # one backward per target, shared by the methods


def test_no_core_module_imports_a_method_module() -> None:
    """The core reaches methods through the registry (camcli.methods, camcli.methods.base) only: map
    arithmetic is in camcli.maps, the guided-backprop mode in camcli.hooks."""
    plugins = {p.stem for p in (ROOT / "camcli" / "methods").glob("*.py")} - {"__init__", "base"}
    assert {"eigen", "guided"} <= plugins
    offenders = []
    for path in sorted((ROOT / "camcli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[:3][-1] in plugins
                          and n.startswith("camcli.methods.")]
    assert offenders == []
