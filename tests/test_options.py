"""Options are declared once: walk the declarations and prove each option reaches every command
that lists it, as a flag and as a file key, and has its effect."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from camcli import options as O
from camcli.cli import app
from camcli.errors import CamcliError, ExitCode, UsageError
from camcli.evaluate import evaluate
from camcli.boxes import Box
from camcli.options import EvaluateOptions, ExplainOptions
from camcli.pipeline import run_explain as explain
from camcli.session import Session
from camcli.targets import ClassIndex, Custom, Reference, Text

runner = CliRunner()
TINY = "toymodels:tiny_cnn"


class Stop(CamcliError):
    """Raised by the spy once the command has opened its session: nothing else needs to run."""

    exit_code = ExitCode.CHECK_FAILED


@pytest.fixture
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    p = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
    return p


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records the options every command builds and the Session it opens, then stops the command."""
    seen: dict[str, Any] = {"built": []}
    real_open = Session.open.__func__  # type: ignore[attr-defined]
    real_build = O.build

    def open_and_stop(cls: type, opts: Any, *, model: Any = None) -> Session:  # noqa: ANN401
        seen["session"] = real_open(cls, opts, model=model)
        raise Stop("stopped by the test")

    def build(command: str, *layers: Any) -> Any:  # noqa: ANN401
        opts = real_build(command, *layers)
        seen["built"].append(opts)
        return opts

    monkeypatch.setattr(Session, "open", classmethod(open_and_stop))
    monkeypatch.setattr(O, "build", build)
    return seen


def _weights(tmp: Path) -> str:
    from toymodels import tiny_cnn

    m = tiny_cnn()
    with torch.no_grad():
        m.fc.weight.mul_(-1)
    p = tmp / "w.pth"
    torch.save(m.state_dict(), p)
    return str(p)


def _labels(tmp: Path) -> str:
    p = tmp / "labels.txt"
    p.write_text("ant\nbee\ncat\ndog\n")
    return str(p)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# name -> (value for the test, or a factory taking tmp_path; what must hold of the opened Session)
SESSION_EFFECTS: dict[str, tuple[Any, Callable[[Session, Any], bool]]] = {
    "model": ("toymodels:negative_head", lambda s, v: s.model.name == v),
    "weights": (_weights, lambda s, v: s.model.weights_sha256 == _sha(v)),
    "labels": (_labels, lambda s, v: s.model.labels == ["ant", "bee", "cat", "dog"]),
    "output_key": ("1", lambda s, v: s.engine.output_key == "1"),  # tuple_out: (logits, probabilities)
    "image_size": (96, lambda s, v: s.model.input_size == 96),
    "device": ("cpu", lambda s, v: s.device.type == "cpu"),
    "precision": ("bf16", lambda s, v: s.engine.precision == "bf16" and s.record()["precision"] == "bf16"),
    "activation": ("sigmoid", lambda s, v: s.activation is O.Activation.SIGMOID
                   and s.engine.config.activation is O.Activation.SIGMOID and s.record()["activation"] == "sigmoid"),
    "method": ("layercam", lambda s, v: [m.name for m in s.methods] == ["layercam"]),
    "layer": ("features.0", lambda s, v: s.layers == ["features.0"]),
    "per_layer": (True, lambda s, v: s.engine.per_layer is True),
    "classes": ("2", lambda s, v: s.specs == [ClassIndex(2)]),
    "batch_size": (3, lambda s, v: s.batch_size == 3),
    "signed": (True, lambda s, v: s.engine.signed is True),
    "aug_smooth": (True, lambda s, v: s.engine.aug_smooth is True),
    "eigen_smooth": (True, lambda s, v: s.engine.eigen_smooth is True),
    "score_channels": (4, lambda s, v: s.engine.options.score_channels == 4),
    "perturbation_batch": (5, lambda s, v: s.engine.options.perturbation_batch == 5),
    "channels": ("top2", lambda s, v: s.engine.options.channels == "top2"),
    "samples": (3, lambda s, v: s.engine.options.samples == 3),
    "noise": (0.3, lambda s, v: s.engine.options.noise == 0.3),
    "seed": (7, lambda s, v: s.engine.options.seed == 7),
    "region": ("0,0,0.5,0.5", lambda s, v: s.engine.region is not None and s.engine.region.box == (0, 0, 0.5, 0.5)),
    "region_mask": (None, lambda s, v: s.engine.region is not None and s.engine.region.mask == v),
    "reference": (None, lambda s, v: isinstance(s.specs[0], Reference) and s.specs[0].path == v),
    "target": ("toymodels:second_minus_first", lambda s, v: isinstance(s.specs[0], Custom) and s.specs[0].name == v),
    "score": ("probability", lambda s, v: s.engine.config.explain_probability and s.record()["score"] == v),
    "text": ("red", lambda s, v: s.specs == [Text("red")] and s.model.labels == ["red"]),
    "mean": ("0.5,0.5,0.5", lambda s, v: s.model.mean == (0.5, 0.5, 0.5) and s.preprocess.mean == (0.5, 0.5, 0.5)),
    "std": ("0.25,0.25,0.25", lambda s, v: s.model.std == (0.25, 0.25, 0.25)),
    "layout": ("nchw", lambda s, v: all(str(lay.spec) == "nchw" for lay in s.engine.layouts.forced.values())),
    "finer_base": ("layercam", lambda s, v: s.engine.options.finer_base == "layercam"),
    "finer_alpha": (1.0, lambda s, v: s.engine.options.finer_alpha == 1.0),
    "finer_references": (1, lambda s, v: s.engine.options.finer_references == 1),
    "discard_ratio": (0.9, lambda s, v: s.engine.options.discard_ratio == 0.9),
    "occlusion_window": (8, lambda s, v: s.engine.options.occlusion_window == 8),
    "occlusion_stride": (4, lambda s, v: s.engine.options.occlusion_stride == 4),
    "occlusion_fill": (-1.0, lambda s, v: s.engine.options.occlusion_fill == -1.0),
    "rise_masks": (64, lambda s, v: s.engine.options.rise_masks == 64),
    "rise_grid": (4, lambda s, v: s.engine.options.rise_grid == 4),
    "rise_keep": (0.3, lambda s, v: s.engine.options.rise_keep == 0.3),
    "quiet": (True, lambda s, v: s.engine.options.progress is False and s.warn.__name__ == "_quiet"),
}
# Options that act outside the Session (files, inputs, metrics): the test that proves each effect.
OTHER_EFFECTS = {
    "out": "test_out_recursive_and_save_raw_have_their_effect",
    "recursive": "test_out_recursive_and_save_raw_have_their_effect",
    "save_raw": "test_out_recursive_and_save_raw_have_their_effect",
    "alpha": "test_alpha_and_colormap_change_the_overlay",
    "colormap": "test_alpha_and_colormap_change_the_overlay",
    "workers": "test_workers_decode_in_parallel_processes",
    "skip_existing": "test_skip_existing_resumes_and_redoes_only_missing",
    "shard": "test_shards_partition_the_inputs_exactly",
    "fail_fast": "test_corrupt_truncated_empty_and_non_image_files_give_exit_3",
    "ray": "test_ray_run_equals_the_local_run",
    "ray_timeout": "test_refused_ray_address_fails_within_ray_timeout",
    "unsafe_load": "test_pickled_module_is_refused_without_opt_in",
    "metric": "test_evaluate_metric_steps_and_plots_have_their_effect",
    "steps": "test_evaluate_metric_steps_and_plots_have_their_effect",
    "plots": "test_evaluate_metric_steps_and_plots_have_their_effect",
    "boxes": "test_evaluate_metric_steps_and_plots_have_their_effect",
    "road_percentages": "test_evaluation_is_deterministic_and_complete",
    "max_pixels": "test_huge_image_is_explained_in_bounded_memory",
}
# Options that only fit another model than the tiny classifier.
NEEDS_MODEL = {"output_key": "toymodels:tuple_out", "region": "toymodels:tiny_seg", "region_mask": "toymodels:tiny_seg",
               "text": "toymodels:tiny_clip"}


def _boxes(tmp: Path) -> str:
    p = tmp / "boxes.json"
    p.write_text(json.dumps({"img.png": [[0, 0, 32, 24]]}))
    return str(p)


# Values whose example needs a file or must stay inside the test's folder.
def _mask(tmp: Path) -> str:
    p = tmp / "mask.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(p)
    return str(p)


def _reference(tmp: Path) -> str:
    p = tmp / "reference.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(p)
    return str(p)


FILE_VALUES: dict[str, Callable[[Path], Any]] = {
    "out": lambda tmp: str(tmp / "elsewhere"), "boxes": _boxes, "region_mask": _mask, "reference": _reference,
}


def _value(name: str, tmp: Path) -> Any:  # noqa: ANN401
    if name in FILE_VALUES:
        return FILE_VALUES[name](tmp)
    if name in SESSION_EFFECTS:
        v = SESSION_EFFECTS[name][0]
    else:
        v = O.BY_NAME[name].example
    return v(tmp) if callable(v) else v


def _cli_args(o: O.Option, value: Any) -> list[str]:  # noqa: ANN401
    if o.kind is O.Kind.BOOL:
        return [o.flags[0]] if value else [f"--no-{o.flags[0][2:]}"]
    return [o.flags[0], str(value)]


def _check_file(tmp: Path, image: Path, extra: dict[str, Any]) -> Path:
    model_keys = {k: v for k, v in extra.items() if O.BY_NAME[k.replace("-", "_")].group == "model" or k == "name"}
    top = {k: v for k, v in extra.items() if k not in model_keys}
    doc: dict[str, Any] = {
        "model": {"name": TINY, **model_keys}, **top,
        # a rule every target passes (--reference and --target have no class for top_k to rank)
        "cases": [{"image": str(image), "expect": {"region": [0, 0, 8, 8], "min_energy_in_region": 0.0}}],
    }
    if "model" in doc["model"]:
        doc["model"]["name"] = doc["model"].pop("model")
    f = tmp / "check.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _invoke(command: str, tmp: Path, image: Path, flags: list[str], file_values: dict[str, Any]) -> Any:  # noqa: ANN401
    """Run ``command`` with flags and file keys; return the CLI result."""
    model = file_values.get("model", NEEDS_MODEL.get(next(iter(file_values), ""), TINY))
    if command == O.CHECK:
        values = {**file_values}
        values.setdefault("model", model)
        return runner.invoke(app, ["check", str(_check_file(tmp, image, values)), *flags])
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump({k: v for k, v in file_values.items()}))
    base = [str(image)] if command != O.LAYERS else []
    model_flag = [] if "--model" in flags or "-m" in flags or "model" in file_values else ["--model", model]
    extra = ["--out", str(tmp / "out")] if command in (O.EXPLAIN, O.EVALUATE) and "--out" not in flags and "out" not in file_values else []
    config = ["--config", str(cfg)] if command in (O.EXPLAIN, O.EVALUATE) else []
    return runner.invoke(app, [command, *base, *model_flag, *extra, *config, *flags])


WALK = [(o.name, c) for o in O.OPTIONS for c in sorted(o.commands)]


@pytest.mark.parametrize("name,command", WALK, ids=[f"{c}:{n}" for n, c in WALK])
def test_each_option_reaches_each_command_as_flag_and_file_key(
    name: str, command: str, tmp_path: Path, image: Path, spy: dict[str, Any]
) -> None:
    o = O.BY_NAME[name]
    value = _value(name, tmp_path)
    assert value is not None and value != o.default_for(command), f"{name}: needs a non-default test value"
    ways: list[tuple[list[str], dict[str, Any]]] = []
    if o.flags:
        ways.append((_cli_args(o, value), {}))
    if o.in_files and command != O.LAYERS:
        ways.append(([], {o.key: value}))
    assert ways, f"{name} is reachable neither as a flag nor as a file key"
    for flags, file_values in ways:
        if name in NEEDS_MODEL:
            file_values = {**file_values}
            flags = [*flags, "--model", NEEDS_MODEL[name]] if command != O.CHECK else flags
            if command == O.CHECK:
                file_values.setdefault("model", NEEDS_MODEL[name])
        spy["built"].clear()
        spy.pop("session", None)
        r = _invoke(command, tmp_path, image, flags, file_values)
        how = f"{'flag ' + ' '.join(flags) if flags else 'file key ' + o.key} in `camcli {command}`"
        assert spy["built"], f"{how}: no options were built ({r.output})"
        got = getattr(spy["built"][-1], name)
        expected = O.typed(o, value)
        assert got == expected and type(got) is type(expected), f"{how}: the options hold {got!r}, not {expected!r}"
        assert not isinstance(got, str) or o.kind is O.Kind.STR, f"{how}: a {o.kind.value} option holds text"
        if command == O.LAYERS:
            assert r.exit_code == 0, f"{how}: {r.output}"
            continue
        if name in SESSION_EFFECTS:
            assert "session" in spy, f"{how}: no session was opened ({r.output})"
            assert SESSION_EFFECTS[name][1](spy["session"], value), f"{how}: the session does not show it"
        else:
            assert name in OTHER_EFFECTS, f"{name}: no effect is tested (add it to SESSION_EFFECTS or OTHER_EFFECTS)"


def test_other_effects_name_real_tests() -> None:
    names = set()
    for f in Path(__file__).parent.glob("test_*.py"):
        names.update(line.split("(")[0][4:] for line in f.read_text().splitlines() if line.startswith("def test_"))
    missing = {o: t for o, t in OTHER_EFFECTS.items() if t not in names}
    assert not missing, missing
    declared = {o.name for o in O.OPTIONS}
    assert set(SESSION_EFFECTS) | set(OTHER_EFFECTS) == declared


def test_derived_records_and_fingerprint() -> None:
    opts = ExplainOptions()
    rec = O.record(opts)
    assert set(rec) == {o.key for o in O.options_for("explain") if o.record}
    assert "quiet" not in rec and "class" in rec
    base = O.fingerprint(opts)
    for o in O.options_for("explain"):
        changed = ExplainOptions(**{o.name: O.BY_NAME[o.name].example})
        differs = O.fingerprint(changed) != base
        assert differs == o.shapes_output, f"{o.name}: fingerprint {'ignores' if o.shapes_output else 'depends on'} it"


def test_each_options_class_declares_exactly_its_commands_options_with_types() -> None:
    import typing

    for command, cls in O.OPTIONS_CLASS.items():
        assert cls.COMMAND == command
        declared = O.declared_fields(cls)
        assert set(declared) == {o.name for o in O.options_for(command)}, command
        hints = typing.get_type_hints(cls)
        for name, o in declared.items():
            assert o is O.BY_NAME[name]
            assert hints[name] is not Any, f"{command}: {name} is untyped"
        assert dataclasses.fields(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_values_get_their_real_type_once_at_construction() -> None:
    opts = ExplainOptions(method="gradcam, layercam", layer=["features.0", "features.2,features.3"],
                          classes=["1,top2"], mean="0.5,0.5,0.5", precision="bf16")
    assert opts.method == ("gradcam", "layercam")
    assert opts.layer == ("features.0", "features.2", "features.3")
    assert opts.classes == ("1", "top2")
    assert opts.mean == (0.5, 0.5, 0.5) and opts.std is None
    assert ExplainOptions(region="0,0,0.5,0.5").region == Box((0.0, 0.0, 0.5, 0.5), "fraction")
    assert ExplainOptions(region="pixels:0,0,1,1").region == Box((0.0, 0.0, 1.0, 1.0), "pixels")
    assert opts.precision is O.Precision.BF16
    assert EvaluateOptions(road_percentages="10,50").road_percentages == (10, 50)
    assert ExplainOptions() == ExplainOptions(method=("gradcam",))  # the default, typed
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.method = ("cam",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        ExplainOptions("m")  # type: ignore[misc]  # keywords only: no option depends on field order


def test_bad_values_are_named_as_given() -> None:
    for kw, message in [
        ({"method": "gradcam,"}, "--method 'gradcam,' has an empty item"),
        ({"mean": "0.5,x,0.5"}, "--mean '0.5,x,0.5' is not three numbers"),
        ({"precision": "fp64"}, "--precision 'fp64' is not one of fp32, bf16, fp16, auto"),
        ({"region": "a,b,c,d"}, "--region 'a,b,c,d' is not a box x0,y0,x1,y1"),
        ({"region": "5,5,1,1"}, "--region '5,5,1,1' is not a box x0,y0,x1,y1"),
    ]:
        with pytest.raises(UsageError, match=re.escape(message)):
            ExplainOptions(**kw).validate()
    with pytest.raises(UsageError, match=re.escape("--std '1,0,1': every value must be greater than 0")):
        Session.open(ExplainOptions(model=TINY, std="1,0,1"))  # found when the model loads, as before


def test_python_callers_may_still_give_method_text() -> None:
    from camcli.methods import parse_methods

    def names(x: Any) -> list[str]:  # noqa: ANN401
        return [m.name for m in parse_methods(x)]

    assert names("gradcam++") == ["gradcam++"]  # the README's call: one name, not its letters
    assert names("gradcam, layercam") == names(("gradcam", "layercam")) == ["gradcam", "layercam"]


# Computed before options were typed (182a054 with --discard-ratio and --ray-timeout added, which
# shape outputs and so entered every fingerprint): an unchanged run keeps its fingerprint, so
# --skip-existing reuses the outputs of runs made before.
PINNED_FINGERPRINTS = [
    ({}, "eb311361f2be88c1"),
    ({"method": "gradcam,layercam", "layer": "features.0,features.2", "classes": ["1", "top2"], "precision": "fp32",
      "mean": "0.5,0.5,0.5", "std": "0.25,0.25,0.25"}, "ab8bf54cd5207b1b"),
    ({"method": "gradcam, layercam", "classes": ["1,2"]}, "a9d78275a14728bd"),
    ({"method": ["gradcam", "layercam"], "layer": ["features.0"], "classes": ["1", "2"]}, "1f29f0a44dc235e7"),
    ({"precision": "bf16", "device": "cpu", "samples": 3, "noise": 0.3}, "b5f3bd9633db2f7c"),
]


@pytest.mark.parametrize("kw,expected", PINNED_FINGERPRINTS)
def test_fingerprint_of_an_unchanged_run_is_what_it_was(kw: dict[str, Any], expected: str) -> None:
    opts = ExplainOptions(model=TINY, quiet=True, **kw)
    session = Session.open(opts)
    assert session.fingerprint() == expected
    # the Ray driver opens its session on a copy with another --device: the spelling travels with it
    assert O.fingerprint(dataclasses.replace(opts, device="cpu")) == O.fingerprint(opts)
    assert O.fingerprint(ExplainOptions(**dataclasses.asdict(opts))) == O.fingerprint(opts)  # a Ray actor's copy


def test_records_keep_list_options_as_they_were_given() -> None:
    opts = EvaluateOptions(metric="deletion_auc,pointing_game", road_percentages=[10, 50], mean="0.5,0.5,0.5")
    rec = O.record(opts)
    assert rec["metric"] == "deletion_auc,pointing_game" and rec["mean"] == "0.5,0.5,0.5"
    assert json.dumps(rec["road_percentages"]) == "[10, 50]" and json.dumps(rec["precision"]) == '"fp32"'
    assert O.record(dataclasses.replace(opts, metric="complexity"))["metric"] == "complexity"


# -- each option that shapes a map changes the maps --------------------------------------------------
def _maps(method: str, model: Any = None, **kw: Any) -> list[np.ndarray]:  # noqa: ANN401
    opts = ExplainOptions(model=kw.pop("model_name", TINY), method=method, quiet=True, **kw)
    s = Session.open(opts)
    rng = np.random.default_rng(3)
    rgbs = rng.integers(0, 255, (2, 40, 56, 3), dtype=np.uint8)
    batch = torch.stack([s.preprocess.resize(rgb) for rgb in rgbs])  # at the session's --image-size
    return [m.cam for o in s.explain_images(batch) for m in o.maps]


@pytest.mark.parametrize(
    "method,changed,base",
    [
        ("scorecam", {"score_channels": 1}, {}),
        ("ss-cam", {"samples": 1}, {"samples": 3}),
        ("ss-cam", {"noise": 0.5}, {}),
        ("ss-cam", {"seed": 1}, {}),
        ("activations", {"channels": "0"}, {}),
        ("gradcam", {"signed": True}, {}),
        ("gradcam", {"aug_smooth": True}, {}),
        ("gradcam", {"eigen_smooth": True}, {}),
        ("gradcam", {"layer": "features.0"}, {}),
        ("gradcam", {"image_size": 64}, {}),
        ("gradcam", {"classes": "3"}, {"classes": "0"}),
        ("finercam", {"finer_alpha": 1.0}, {}),
        ("finercam", {"finer_references": 1}, {}),
        ("finercam", {"finer_base": "layercam"}, {}),
        ("occlusion", {"occlusion_window": 32, "image_size": 64}, {"image_size": 64}),
        ("occlusion", {"occlusion_stride": 16, "image_size": 64}, {"image_size": 64}),
        ("occlusion", {"occlusion_fill": -2.0, "image_size": 64}, {"image_size": 64}),
        ("rise", {"rise_masks": 48, "image_size": 64}, {"rise_masks": 32, "image_size": 64}),
        ("rise", {"rise_grid": 3, "rise_masks": 32, "image_size": 64}, {"rise_masks": 32, "image_size": 64}),
        ("rise", {"rise_keep": 0.2, "rise_masks": 32, "image_size": 64}, {"rise_masks": 32, "image_size": 64}),
        ("rise", {"seed": 1, "rise_masks": 32, "image_size": 64}, {"rise_masks": 32, "image_size": 64}),
        ("gradcam", {"output_key": "aux", "model_name": "toymodels:dict_out"},
         {"output_key": "main", "model_name": "toymodels:dict_out"}),
    ],
)
def test_shaping_options_change_the_maps(method: str, changed: dict[str, Any], base: dict[str, Any]) -> None:
    a, b = _maps(method, **base), _maps(method, **changed)
    assert len(a) == len(b)
    assert any(x.shape != y.shape or not np.allclose(x, y, atol=1e-4) for x, y in zip(a, b))


def test_perturbation_and_batch_size_change_forward_calls_not_maps(tmp_path: Path, small_images: Path) -> None:
    from camcli.models import load_model

    def run(**kw: Any) -> tuple[list[np.ndarray], int]:  # noqa: ANN401
        lm = load_model(TINY)
        calls = [0]
        lm.module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        res = explain([small_images], ExplainOptions(out=str(out), method="scorecam", save_raw=True, quiet=True,
                                                     workers=0, **kw), model=lm)
        maps = [np.load(out / e["raw"]) for im in res.images for e in im["explanations"]]
        return maps, calls[0]

    m1, c1 = run(perturbation_batch=1, batch_size=1)
    m2, c2 = run(perturbation_batch=6, batch_size=2)
    assert c1 > c2
    for a, b in zip(m1, m2):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_out_recursive_and_save_raw_have_their_effect(small_images: Path, tmp_path: Path) -> None:
    flat = explain([small_images], ExplainOptions(model=TINY, out=str(tmp_path / "a"), quiet=True))
    deep = explain([small_images], ExplainOptions(model=TINY, out=str(tmp_path / "b"), recursive=True, save_raw=True,
                                                  quiet=True))
    assert flat.summary_path == tmp_path / "a" / "summary.json" and flat.summary_path.is_file()
    assert flat.summary["counts"]["images"] == 2 and deep.summary["counts"]["images"] == 3
    assert list((tmp_path / "b").rglob("*.npy")) and not list((tmp_path / "a").rglob("*.npy"))


def test_alpha_and_colormap_change_the_overlay(image: Path, tmp_path: Path) -> None:
    def overlay(**kw: Any) -> np.ndarray:  # noqa: ANN401
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        explain([image], ExplainOptions(model=TINY, out=str(out), quiet=True, **kw))
        return np.asarray(Image.open(out / "img.gradcam.png"))

    base = overlay()
    assert not np.array_equal(base, overlay(alpha=0.9))
    assert not np.array_equal(base, overlay(colormap="viridis"))


def test_evaluate_metric_steps_and_plots_have_their_effect(image: Path, tmp_path: Path) -> None:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"img.png": [[0, 0, 32, 24]]}))
    res = evaluate([image], EvaluateOptions(model=TINY, metric="deletion_auc,pointing_game", steps=4, plots=True,
                                            boxes=str(boxes), out=str(tmp_path / "ev"), quiet=True))
    assert set(res.aggregate["gradcam"]) == {"deletion_auc", "pointing_game"}
    assert len(res.curves["gradcam"]["deletion"]) == 5  # the mean curve: steps + 1 points
    assert (tmp_path / "ev" / "deletion_curve.png").is_file()
    doc = json.loads(res.path.read_text())
    assert doc["options"]["steps"] == 4 and doc["options"]["metric"] == "deletion_auc,pointing_game"


# -- the drift the issue reported, one test each --------------------------------------------------
def test_check_file_output_key_reaches_the_model(image: Path, tmp_path: Path) -> None:
    from camcli.check import run_check

    def top_rule(key: str) -> Any:  # noqa: ANN401
        f = tmp_path / f"{key}.yaml"
        f.write_text(yaml.safe_dump({
            "model": {"name": "toymodels:dict_out", "output_key": key},
            "cases": [{"image": str(image), "class": 0, "expect": {"top_k": 1}}],
        }))
        return run_check(f).rules[0]

    main, aux = top_rule("main"), top_rule("aux")
    assert main.value != aux.value or main.message != aux.message  # the other head ranks class 0 differently


def test_fingerprint_depends_on_output_key(tmp_path: Path) -> None:
    a = Session.open(ExplainOptions(model="toymodels:dict_out", output_key="main", quiet=True))
    b = Session.open(ExplainOptions(model="toymodels:dict_out", output_key="aux", quiet=True))
    assert a.fingerprint() != b.fingerprint()


def test_quiet_silences_warnings(small_images: Path, tmp_path: Path) -> None:
    args = ["explain", str(small_images), "--model", "toymodels:negative_head", "--out", str(tmp_path / "o")]
    loud = runner.invoke(app, args)
    quiet = runner.invoke(app, [*args, "-q"])
    assert "warning" in loud.stderr and "gradcam: the map is empty" in loud.stderr
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_evaluate_score_channels_flag_and_baselines_independent_of_method_order(image: Path, tmp_path: Path) -> None:
    def agg(methods: str) -> dict[str, Any]:  # noqa: ANN401
        r = runner.invoke(app, ["evaluate", str(image), "--model", TINY, "-M", methods, "--metric", "deletion_auc",
                                "--steps", "4", "--score-channels", "2", "--out", str(tmp_path / methods), "-q"])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / methods / "evaluation.json").read_text())

    a, b = agg("guided-backprop,gradcam"), agg("gradcam,guided-backprop")
    assert a["aggregate"]["baseline:random"] == b["aggregate"]["baseline:random"]
    assert a["options"]["score_channels"] == 2


def test_config_and_check_files_reject_unknown_keys_with_a_suggestion(tmp_path: Path, image: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("score_chanels: 4\n")
    r = runner.invoke(app, ["evaluate", str(image), "--config", str(cfg)])
    assert r.exit_code == 2 and "did you mean 'score-channels'" in r.output
    cfg.write_text("steps: 4\n")  # an evaluate option is no explain key
    r = runner.invoke(app, ["explain", str(image), "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown key 'steps'" in r.output
