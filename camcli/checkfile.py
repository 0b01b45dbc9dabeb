"""The `camcli check` file: parsed and validated completely before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camcli import options as O
from camcli.boxes import BoxError, parse_box
from camcli.config import read_yaml
from camcli.errors import ImageError, UsageError, suggest
from camcli.images import image_size
from camcli.methods import MethodInfo, parse_methods

# Keys of the file's own; every other top-level key is an option of `check` (camcli.options), and
# the model options may also sit inside ``model:`` (with ``name`` for the model itself).
FILE_KEYS = ("model", "baselines", "cases")
CASE_KEYS = {"image", "class", "reference", "name", "expect"}
EXPECT_KEYS = {"top_k", "region", "region_mask", "min_energy_in_region", "peak_in_region", "min_baseline_similarity"}
RULES = ("top_k", "min_energy_in_region", "peak_in_region", "min_baseline_similarity")  # what a case checks


class CheckFileError(UsageError):
    """The check file itself is wrong (exit 2)."""


@dataclass
class Expect:
    top_k: int | None = None
    region: tuple[int, int, int, int] | None = None  # pixels, x0 y0 x1 y1 (exclusive ends)
    region_mask: Path | None = None
    min_energy_in_region: float | None = None
    peak_in_region: bool | None = None
    min_baseline_similarity: float | None = None


@dataclass
class Case:
    index: int
    name: str
    image: Path
    width: int
    height: int
    spec: int | str | None  # the case's `class:` as written: a target spec, resolved by camcli.targets
    expect: Expect
    reference: Path | None = None  # the case's `reference:` image: explain the similarity to its embedding


@dataclass
class CheckFile:
    path: Path
    options: O.CheckOptions  # model, layer, method, device and every map option
    methods: list[MethodInfo]
    baselines: Path | None
    cases: list[Case]
    raw: dict[str, Any] = field(default_factory=dict)


def _err(path: Path, where: str, msg: str) -> CheckFileError:
    return CheckFileError(f"{path}: {where}: {msg}")


def _check_keys(path: Path, where: str, data: dict[str, Any], allowed: set[str]) -> None:
    for k in data:
        if k not in allowed:
            raise _err(path, where, f"unknown key {k!r}{suggest(str(k), allowed) or ''} (accepted: {', '.join(sorted(allowed))})")


def _bound(path: Path, where: str, value: Any) -> float:  # noqa: ANN401
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise _err(path, where, f"{value!r} is not a bound in [0, 1]")
    return float(value)


def _region(path: Path, where: str, value: Any, w: int, h: int) -> tuple[int, int, int, int]:  # noqa: ANN401
    try:
        box = parse_box(value, plain_fractions=True)
    except BoxError as e:
        raise _err(path, where, f"{e} (a box [x0, y0, x1, y1] in pixels, or {{fraction: [x0, y0, x1, y1]}})") from None
    x0, y0, x1, y1 = (int(round(v)) for v in box.pixels(w, h))
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise _err(
            path, where, f"box {value} lies outside the {w}x{h} image or is empty (need 0 <= x0 < x1 <= {w}, "
            f"0 <= y0 < y1 <= {h})"
        )
    return x0, y0, x1, y1


def _image_size(path: Path, where: str, image: Path, max_pixels: int) -> tuple[int, int]:
    if not image.exists():
        raise _err(path, where, f"image {str(image)!r} does not exist")
    try:
        return image_size(image, max_pixels)
    except ImageError as e:
        raise _err(path, where, str(e)) from None
    except Exception as e:  # noqa: BLE001 - any decoding problem is a file error here
        raise _err(path, where, f"image {str(image)!r} cannot be read ({e})") from None


def case_id(case: Case) -> str:
    return f"{case.index:03d}-{case.name}"


def baseline_path(baselines: Path, case: Case, method: str) -> Path:
    return baselines / f"{case_id(case)}.{method.replace('+', 'p')}.npy"


def _local(root: Path, value: str) -> str:
    """A path relative to the check file's folder when it names a file there; else as given."""
    f = Path(value) if Path(value).is_absolute() else root / value
    return str(f) if f.exists() else value


def _file_options(p: Path, data: dict[str, Any], overrides: dict[str, Any] | None) -> Any:  # noqa: ANN401
    """The check file's option keys (top level and ``model:``) plus command-line overrides."""
    root = p.parent
    model = data.get("model") or {}
    if isinstance(model, str):
        model = {"name": model}
    if not isinstance(model, dict):
        raise _err(p, "model", "expected a name or a mapping {name, weights, labels, ...}")
    model = {("model" if str(k) == "name" else k): v for k, v in model.items()}
    if "model" in model and not isinstance(model["model"], str):
        raise _err(p, "model.name", f"{model['model']!r} is not a model name")
    try:
        values = O.read_file_options(data, O.CHECK, f"{p}: top level", ignore=FILE_KEYS)
        values.update(O.read_file_options(model, O.CHECK, f"{p}: model", group="model"))
    except UsageError as e:
        raise CheckFileError(str(e)) from None
    for key in ("weights", "labels", "reference"):
        if values.get(key) and values[key] != "random":
            f = Path(values[key]) if Path(values[key]).is_absolute() else root / values[key]
            if not f.is_file():
                raise _err(p, key if key == "reference" else f"model.{key}", f"file {str(f)!r} does not exist")
            values[key] = str(f)
    if values.get("model"):
        values["model"] = _local(root, values["model"])
    try:
        return O.build(O.CHECK, values, overrides or {})
    except UsageError as e:
        raise CheckFileError(f"{p}: {e}") from None


def load_check_file(
    path: str | Path, *, require_baselines: bool = True, overrides: dict[str, Any] | None = None
) -> CheckFile:
    """Parse and validate everything that can be checked without the model.

    ``overrides``: option values given on the command line; they win over the file's.
    """
    p = Path(path)
    data = read_yaml(p, str(p), CheckFileError)
    if not isinstance(data, dict):
        raise CheckFileError(f"{p}: expected a mapping with a 'cases' list")
    root = p.parent
    opts = _file_options(p, data, overrides)
    try:
        methods = parse_methods(opts.method)
    except UsageError as e:
        raise _err(p, "method", str(e)) from None

    baselines = None
    if data.get("baselines") is not None:
        baselines = root / str(data["baselines"])

    cases_raw = data.get("cases")
    if not isinstance(cases_raw, list) or not cases_raw:
        raise _err(p, "cases", "expected a non-empty list of cases")
    cases: list[Case] = []
    for i, c in enumerate(cases_raw):
        where = f"cases[{i}]"
        if not isinstance(c, dict):
            raise _err(p, where, "expected a mapping with image, class, expect")
        _check_keys(p, where, c, CASE_KEYS)
        if "image" not in c:
            raise _err(p, where, "missing key 'image'")
        image = root / str(c["image"])
        w, h = _image_size(p, f"{where}.image", image, opts.max_pixels)
        spec = c.get("class")
        if spec is not None and (isinstance(spec, bool) or not isinstance(spec, (int, str))):
            raise _err(p, f"{where}.class", f"{spec!r} is not a class index or label")
        reference = None
        if spec is not None and (opts.reference is not None or opts.target is not None):
            raise _err(p, f"{where}.class", f"{spec!r}: the check explains one scalar per case (--reference or "
                       "--target), not a class: drop the case's class")
        if c.get("reference") is not None:
            if spec is not None:
                raise _err(p, where, "give class or reference, not both: a reference case explains the similarity "
                           "to the reference image's embedding, no class")
            reference = root / str(c["reference"])
            _image_size(p, f"{where}.reference", reference, opts.max_pixels)
        exp_raw = c.get("expect") or {}
        if not isinstance(exp_raw, dict):
            raise _err(p, f"{where}.expect", "expected a mapping of rules")
        _check_keys(p, f"{where}.expect", exp_raw, EXPECT_KEYS)
        ex = Expect()
        if "top_k" in exp_raw:
            k = exp_raw["top_k"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise _err(p, f"{where}.expect.top_k", f"{k!r} is not a positive integer")
            ex.top_k = k
        if "region" in exp_raw and "region_mask" in exp_raw:
            raise _err(p, f"{where}.expect", "give either region or region_mask, not both")
        if "region" in exp_raw:
            ex.region = _region(p, f"{where}.expect.region", exp_raw["region"], w, h)
        if "region_mask" in exp_raw:
            mask = root / str(exp_raw["region_mask"])
            mw, mh = _image_size(p, f"{where}.expect.region_mask", mask, opts.max_pixels)
            if (mw, mh) != (w, h):
                raise _err(p, f"{where}.expect.region_mask", f"mask is {mw}x{mh}, the image is {w}x{h}")
            ex.region_mask = mask
        if "min_energy_in_region" in exp_raw:
            ex.min_energy_in_region = _bound(p, f"{where}.expect.min_energy_in_region", exp_raw["min_energy_in_region"])
        if "peak_in_region" in exp_raw:
            if not isinstance(exp_raw["peak_in_region"], bool):
                raise _err(p, f"{where}.expect.peak_in_region", f"{exp_raw['peak_in_region']!r} is not true or false")
            ex.peak_in_region = exp_raw["peak_in_region"]
        if (ex.min_energy_in_region is not None or ex.peak_in_region is not None) and ex.region is None and ex.region_mask is None:
            raise _err(p, f"{where}.expect", "min_energy_in_region and peak_in_region need a region or region_mask")
        if "min_baseline_similarity" in exp_raw:
            ex.min_baseline_similarity = _bound(
                p, f"{where}.expect.min_baseline_similarity", exp_raw["min_baseline_similarity"]
            )
            if baselines is None:
                raise _err(p, f"{where}.expect.min_baseline_similarity", "needs a top-level 'baselines' folder")
        if all(getattr(ex, rule) is None for rule in RULES):
            raise _err(p, f"{where}.expect", f"case {c.get('name') or image.stem!r} has no rules, so it could never fail; "
                       f"give at least one of {', '.join(RULES)}")
        name = str(c.get("name") or image.stem)
        if ex.top_k is not None and (reference is not None or opts.reference is not None or opts.target is not None):
            raise _err(p, f"{where}.expect.top_k", "top_k ranks the case's class; a case explained by a reference "
                       "or a target callable has none (use the region and baseline rules)")
        cases.append(Case(i, name, image, w, h, spec, ex, reference))

    cf = CheckFile(path=p, options=opts, methods=methods, baselines=baselines, cases=cases, raw=data)
    if require_baselines and baselines is not None:
        for case in cases:
            if case.expect.min_baseline_similarity is None:
                continue
            for m in methods:
                b = baseline_path(baselines, case, m.name)
                if not b.is_file():
                    raise _err(
                        p, f"cases[{case.index}].expect.min_baseline_similarity",
                        f"baseline {str(b)!r} for method {m.name} is missing; create it with "
                        f"`camcli check {p} --update-baselines`",
                    )
                from camcli.fullmap import baseline_problem  # numpy's .npy reader, only when there are baselines

                problem = baseline_problem(b)
                if problem is not None:
                    raise _err(
                        p, f"cases[{case.index}].expect.min_baseline_similarity",
                        f"baseline {str(b)!r} for method {m.name} {problem}; recreate it with "
                        f"`camcli check {p} --update-baselines`",
                    )
    return cf
