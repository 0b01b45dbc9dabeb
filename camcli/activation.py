"""The output's activation: how a model's outputs become the numbers camcli reports.

``--activation`` is softmax, sigmoid, none (the raw output) or auto. ``auto`` is resolved once per
session (Session.open) from what the model says of itself, by :func:`resolve`; the records' values,
the top-k ranking (and so check's ``top_k`` rule) and evaluate's curves all read
:func:`probabilities` with the resolved activation. Segmentation models have none: their classes
are ranked by the share of pixels each wins (camcli/targets.py ``pixel_shares``).

The rules of ``auto``, in order (the README's "Output activation" table):

1. a segmentation model: no activation (pixel shares);
2. a Hugging Face config's ``problem_type``: ``multi_label_classification`` -> sigmoid,
   ``regression`` -> none;
3. a run that explains another scalar than a class (``--reference``, ``--target``): none, since the
   outputs are an embedding or whatever the callable reads, not class logits;
4. one output: sigmoid when a label names it (a ``--labels`` file with one label, or a Hugging Face
   ``id2label`` that is not the generated ``LABEL_0``): the output is that class's logit, a binary
   classifier; none otherwise (a regressor, or a logit nobody named): the raw value, never a
   constant 1. Pass ``--activation sigmoid`` for an unnamed binary logit;
5. otherwise softmax.
"""

from __future__ import annotations

from torch import Tensor

from camcli.errors import UsageError
from camcli.options import Activation

# What the number beside a class is called in records, by the activation that made it (segmentation:
# "pixel_share", see camcli/report.py): a raw output is not a probability.
VALUE_KEYS = {Activation.SOFTMAX: "probability", Activation.SIGMOID: "probability", Activation.NONE: "value"}

MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"


def resolve(
    requested: Activation | str,
    *,
    outputs: int,
    task: str = "classification",
    named: bool = False,
    problem_type: str | None = None,
    scalar_target: bool = False,
) -> Activation | None:
    """The activation a session uses: ``requested`` unless it is ``auto`` (the rules above).

    ``outputs``: the model's classes (output units); ``named``: the model's outputs have labels;
    ``problem_type``: a Hugging Face config's; ``scalar_target``: the run explains a --reference
    similarity or a --target callable, not a class. None for a segmentation model (pixel shares);
    asking one for sigmoid or none is a UsageError.
    """
    requested = Activation(requested)
    if task == "segmentation":
        if requested in (Activation.SIGMOID, Activation.NONE):
            raise UsageError(
                f"--activation {requested.value} is for classifiers: a segmentation model's classes are ranked by "
                "the share of pixels each wins (accepted here: auto, softmax)"
            )
        return None
    if requested is not Activation.AUTO:
        return requested
    if problem_type == MULTI_LABEL:
        return Activation.SIGMOID
    if problem_type == REGRESSION:
        return Activation.NONE
    if scalar_target:
        return Activation.NONE
    if outputs == 1:
        return Activation.SIGMOID if named else Activation.NONE
    return Activation.SOFTMAX


def probabilities(scores: Tensor, activation: Activation | None) -> Tensor:
    """(N, classes) model outputs -> the values records and rankings read, per class: softmax over
    the classes, each output's own sigmoid, or the outputs as they are. Stays on the device."""
    if activation is Activation.SIGMOID:
        return scores.sigmoid()
    if activation is Activation.NONE:
        return scores
    return scores.softmax(dim=1)


def value_key(activation: Activation | None) -> str:
    """The record key of a classifier's per-class number under ``activation``."""
    return VALUE_KEYS.get(activation or Activation.SOFTMAX, "probability")
