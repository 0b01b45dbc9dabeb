"""The metric registry: every `evaluate` metric declared once, as methods are (camcli/methods/base.py).

A metric says its name, which direction is better, whether it needs ``--boxes``, whether it runs
when ``--metric`` is not given, and which perturbed inputs (a *probe*) it reads. Probes are shared:
Average Drop and Increase in Confidence read one explanation image, the three ROAD scores one set
of imputed images. `evaluate` runs one loop over the wanted metrics and knows none of them by name.
The formulas themselves are the pure functions of camcli/metrics.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from camcli import metrics as M
from camcli.errors import UsageError, suggest


@dataclass(frozen=True)
class ProbeContext:
    """What a probe needs to make one map's perturbed inputs."""

    x: Tensor  # the normalised input (3, H, W), on the model's device
    cam: Tensor  # the map at input resolution (H, W), on the host, >= 0
    device: torch.device
    mean: Sequence[float]  # the model's normalisation
    std: Sequence[float]
    steps: int  # --steps
    road_percentages: Sequence[int]
    seed: int


@dataclass(frozen=True)
class Probe:
    """Perturbed inputs that one or more metrics read, scored once per map by the Batcher."""

    name: str
    inputs: Callable[[ProbeContext], M.Inputs]
    curve: bool = False  # its probabilities are a curve over fractions of pixels (plotted by --plots)


def _constant(t: Tensor) -> M.Inputs:
    return 1, lambda i: t


# In the order their inputs are queued for each map (the order batches are filled in).
PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("deletion", lambda c: M.deletion_inputs(c.x, c.cam.to(c.device), c.steps), curve=True),
    Probe("insertion", lambda c: M.insertion_inputs(c.x, c.cam.to(c.device), c.steps), curve=True),
    Probe("explanation", lambda c: _constant(M.explanation_image(c.x, c.cam.to(c.device), c.mean, c.std))),
    Probe("road", lambda c: M.road_inputs(c.x, c.cam, c.mean, c.std, percentages=c.road_percentages, seed=c.seed)),
)}


@dataclass(frozen=True)
class Detailed:
    """A metric's value with per-map detail, stored in the image's record under the metric's ``detail`` key."""

    value: float | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class MapResult:
    """What a metric reads for one map of one image, after its probes were scored."""

    name: str  # the method or baseline
    cam: Tensor  # (H, W) at input resolution, on the host
    probability: float  # the target probability on the whole image
    probes: dict[str, Tensor]  # probe name -> (n,) target probabilities of its inputs
    boxes: list[list[float]] | None  # the image's boxes in input pixels; None without any
    road_percentages: Sequence[int]
    sanity: Callable[[], Any]  # -> sanity.SanityScore of this map (only called by sanity_spearman)



@dataclass(frozen=True)
class MetricInfo:
    name: str
    fn: Callable[[MapResult], Any]  # -> float, None (undefined) or Detailed
    higher_is_better: bool
    description: str
    probe: str | None = None  # the perturbed inputs it reads (PROBES), if any
    needs_boxes: bool = False  # only with --boxes; skipped on images the file gives no boxes for
    default: bool = True  # run when --metric is not given (box metrics: when --boxes is)
    needs_randomized: bool = False  # needs the model re-initialised (sanity check)
    detail: str | None = None  # the record key its Detailed values go under


_REGISTRY: dict[str, MetricInfo] = {}


def register(name: str, *, better: str, description: str, **meta: Any) -> Callable[[Callable[[MapResult], Any]],
                                                                                   Callable[[MapResult], Any]]:
    """Decorator: ``@register("deletion_auc", better="lower", probe="deletion", description=...)``."""
    if better not in ("higher", "lower"):
        raise ValueError(f"metric {name!r}: better must be 'higher' or 'lower', not {better!r}")
    if meta.get("probe") is not None and meta["probe"] not in PROBES:
        raise ValueError(f"metric {name!r}: unknown probe {meta['probe']!r} (known: {', '.join(PROBES)})")

    def deco(fn: Callable[[MapResult], Any]) -> Callable[[MapResult], Any]:
        if name in _REGISTRY:
            raise ValueError(f"metric name {name!r} is registered twice")
        _REGISTRY[name] = MetricInfo(name=name, fn=fn, higher_is_better=better == "higher", description=description,
                                     **meta)
        return fn

    return deco


def available_metrics() -> list[MetricInfo]:
    """Every registered metric, in registration order (the order of a record's values)."""
    return list(_REGISTRY.values())


def get_metric(name: str) -> MetricInfo:
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise UsageError(f"unknown metric {name!r}{suggest(name, list(_REGISTRY)) or ''} "
                     f"(accepted: {', '.join(_REGISTRY)})")


def parse_metrics(names: Sequence[str] | None, have_boxes: bool) -> list[str]:
    """``--metric``: names (options.names has split the commas), checked and de-duplicated, in the
    order given; None: the default ones (with the box metrics when there are boxes)."""
    if names is None:
        return [m.name for m in _REGISTRY.values() if m.default and (have_boxes or not m.needs_boxes)]
    for n in names:
        if get_metric(n).needs_boxes and not have_boxes:
            raise UsageError(f"metric {n!r} needs --boxes FILE (a JSON or YAML map from image to boxes)")
    return list(dict.fromkeys(names))


def probes_for(metrics: Sequence[str]) -> list[Probe]:
    """The probes the metrics read, in queueing order."""
    wanted = {get_metric(m).probe for m in metrics}
    return [p for name, p in PROBES.items() if name in wanted]


def measure(metrics: Sequence[str], r: MapResult, details: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The one loop: every wanted metric of one map, in registration order, rounded to 6 decimals.
    Detail (the sanity check's rho per seed) goes into ``details[metric.detail][map name]``."""
    wanted = set(metrics)
    vals: dict[str, float | None] = {}
    for m in _REGISTRY.values():
        if m.name not in wanted or (m.needs_boxes and r.boxes is None):
            continue
        v = m.fn(r)
        if isinstance(v, Detailed):
            if m.detail is not None:
                details.setdefault(m.detail, {})[r.name] = v.detail
            v = v.value
        vals[m.name] = None if v is None else round(float(v), 6)
    return vals


# -- the metrics --------------------------------------------------------------------------------
@register("deletion_auc", better="lower", probe="deletion",
          description="area under the target probability as the most relevant pixels are replaced by the mean colour")
def _deletion_auc(r: MapResult) -> float:
    return M.auc(r.probes["deletion"])


@register("insertion_auc", better="higher", probe="insertion",
          description="area under the target probability as the most relevant pixels are put back into a blur")
def _insertion_auc(r: MapResult) -> float:
    return M.auc(r.probes["insertion"])


@register("average_drop", better="lower", probe="explanation",
          description="% of the target probability lost on the explanation image (map x image)")
def _average_drop(r: MapResult) -> float:
    return M.average_drop(r.probability, float(r.probes["explanation"][0]))


@register("increase_in_confidence", better="higher", probe="explanation",
          description="100 when the explanation image is more confident than the image, else 0")
def _increase_in_confidence(r: MapResult) -> float:
    return M.increase_in_confidence(r.probability, float(r.probes["explanation"][0]))


@register("complexity", better="lower", description="the map's mean value")
def _complexity(r: MapResult) -> float:
    return M.complexity(r.cam)


def _road(r: MapResult, which: int) -> float:
    return M.road_scores(r.probes["road"], len(r.road_percentages))[which]


@register("road_morf", better="lower", probe="road",
          description="mean probability with the most relevant pixels imputed (ROAD)")
def _road_morf(r: MapResult) -> float:
    return _road(r, 0)


@register("road_lerf", better="higher", probe="road",
          description="mean probability with the least relevant pixels imputed (ROAD)")
def _road_lerf(r: MapResult) -> float:
    return _road(r, 1)


@register("road_combined", better="higher", probe="road", description="(LeRF - MoRF) / 2 (ROAD)")
def _road_combined(r: MapResult) -> float:
    return _road(r, 2)


@register("sanity_spearman", better="lower", needs_randomized=True, detail="sanity",
          description="mean |Spearman rho| between the map and the re-initialised models' maps")
def _sanity_spearman(r: MapResult) -> Detailed:
    score = r.sanity()
    return Detailed(score.value, score.record())


def _cam_array(r: MapResult) -> np.ndarray:
    return r.cam.cpu().numpy()


@register("energy_pointing_game", better="higher", needs_boxes=True,
          description="share of the map's energy inside the boxes")
def _energy_pointing_game(r: MapResult) -> float:
    assert r.boxes is not None
    return M.energy_pointing_game(_cam_array(r), r.boxes)


@register("pointing_game", better="higher", needs_boxes=True, description="1 when the map's peak lies in a box")
def _pointing_game(r: MapResult) -> float:
    assert r.boxes is not None
    return M.pointing_game(_cam_array(r), r.boxes)
