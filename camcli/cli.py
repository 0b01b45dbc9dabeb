"""The command line: parse options, call the plain functions, print. No logic of its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from camcli import __version__
from camcli.errors import CamcliError, ExitCode

app = typer.Typer(
    name="camcli",
    help="Explain image classifiers with class activation maps (Grad-CAM, Grad-CAM++, Score-CAM, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one message, one line, whatever the width


def _stdout() -> Console:
    """Tables for stdout: the terminal's width, or wide enough not to wrap when piped."""
    return Console() if sys.stdout.isatty() else Console(width=200)

T = TypeVar("T")


def _run(fn: Callable[[], T]) -> T:
    """Turn camcli errors into one clear line on stderr and the documented exit code."""
    try:
        return fn()
    except CamcliError as e:
        err.print(f"[bold red]camcli: error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(int(e.exit_code)) from None
    except KeyboardInterrupt:
        err.print("camcli: interrupted; files written so far are complete, the rest were not started")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None


def _version(value: bool) -> None:
    if value:
        print(f"camcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """camcli: class activation maps for image classifiers."""


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m",
        help="Bundled 'efficientnet-lite0' (default), a torchvision/timm architecture name, or module:callable.",
    ),
]
WeightsOpt = Annotated[
    Optional[str],
    typer.Option("--weights", "-w", help="State dict or checkpoint file for --model; 'random' for untrained."),
]
LabelsOpt = Annotated[
    Optional[str], typer.Option("--labels", help="Class names: .txt (one per line) or .json. ImageNet is built in.")
]
UnsafeOpt = Annotated[
    Optional[bool],
    typer.Option("--unsafe-load/--no-unsafe-load", help="Allow pickled code in checkpoints (weights_only=False)."),
]
ImageSizeOpt = Annotated[
    Optional[int], typer.Option("--image-size", help="Model input size: shorter side, or the fixed square side.")
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]


@app.command()
def explain(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    method: Annotated[
        Optional[str], typer.Option("--method", "-M", help="Comma-separated methods (see `camcli methods`). (default: gradcam)")
    ] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    labels: LabelsOpt = None,
    layer: Annotated[
        Optional[str],
        typer.Option("--layer", "-l", help="Dotted module path(s), comma-separated; default: last spatial layer."),
    ] = None,
    per_layer: Annotated[
        Optional[bool], typer.Option("--per-layer/--no-per-layer", help="With several layers, also write each layer's map.")
    ] = None,
    classes: Annotated[
        Optional[list[str]],
        typer.Option("--class", "-c", help="top1 (default), topK, a class index or a label; repeatable or comma-separated."),
    ] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder. (default: camcli-out)")] = None,
    recursive: Annotated[Optional[bool], typer.Option("--recursive/--no-recursive", "-r", help="Descend into subfolders.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per forward pass. (default: 8)")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Decoding worker processes (0: main process). (default: 0 on <= 2 cores, else up to 4)")] = None,
    device: DeviceOpt = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Heatmap opacity, 0..1. (default: 0.5)")] = None,
    colormap: Annotated[Optional[str], typer.Option("--colormap", help="Any OpenCV colormap name, or diverging. (default: jet; diverging with --signed)")] = None,
    image_size: ImageSizeOpt = None,
    save_raw: Annotated[Optional[bool], typer.Option("--save-raw/--no-save-raw", help="Also write float32 .npy maps at full resolution.")] = None,
    signed: Annotated[Optional[bool], typer.Option("--signed/--no-signed", help="Keep negative evidence (no ReLU); diverging colours.")] = None,
    aug_smooth: Annotated[Optional[bool], typer.Option("--aug-smooth/--no-aug-smooth", help="Average maps over flips and rescales (4 passes).")] = None,
    eigen_smooth: Annotated[Optional[bool], typer.Option("--eigen-smooth/--no-eigen-smooth", help="First principal component of the weighted activations instead of their sum.")] = None,
    score_channels: Annotated[Optional[int], typer.Option("--score-channels", help="Score-CAM family: use the N channels with most activation.")] = None,
    perturbation_batch: Annotated[Optional[int], typer.Option("--perturbation-batch", help="Masked inputs per forward pass. (default: 16)")] = None,
    channels: Annotated[Optional[str], typer.Option("--channels", help="`activations` method: mean, a channel index, or topN.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="ss-cam / smoothgradcam++ noise samples; is-cam steps. (default: 8)")] = None,
    noise: Annotated[Optional[float], typer.Option("--noise", help="ss-cam / smoothgradcam++ noise std, share of the input range. (default: 0.1)")] = None,
    output_key: Annotated[Optional[str], typer.Option("--output-key", help="Which item of a tuple/dict model output holds the logits.")] = None,
    unsafe_load: UnsafeOpt = None,
    skip_existing: Annotated[Optional[bool], typer.Option("--skip-existing/--no-skip-existing", help="Skip images whose outputs a previous run with the same options completed.")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: process a deterministic 1/N of the inputs (job arrays).")] = None,
    fail_fast: Annotated[Optional[bool], typer.Option("--fail-fast/--no-fail-fast", help="Stop at the first image that fails.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with the same keys as these options; flags win.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages on stderr.")] = False,
) -> None:
    """Write overlay PNGs (and optional raw maps) plus summary.json for images or folders.

    Example: camcli explain photos/ -r --method gradcam,layercam --class top3 --out heatmaps/
    """
    from camcli.config import merge, read_config
    from camcli.pipeline import explain as run_explain
    from camcli.progress import Progress

    def go() -> ExitCode:
        cfg = read_config(config) if config is not None else {}
        opts = merge(
            cfg,
            dict(
                model=model, weights=weights, labels=labels, unsafe_load=unsafe_load, output_key=output_key,
                layer=layer, per_layer=per_layer, method=method, classes=classes, out=out_dir, recursive=recursive,
                batch_size=batch_size, workers=workers, device=device, alpha=alpha, colormap=colormap,
                image_size=image_size, save_raw=save_raw, signed=signed, fail_fast=fail_fast,
                aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, skip_existing=skip_existing, shard=shard,
                score_channels=score_channels, perturbation_batch=perturbation_batch, channels=channels,
                samples=samples, noise=noise,
                quiet=quiet or None,
            ),
        )
        with Progress(disable=opts.quiet) as bar:
            result = run_explain(paths, opts, progress=bar.update, on_start=bar.start)
        s = result.summary
        if as_json:
            sys.stdout.write(json.dumps(s, indent=2) + "\n")
        if not opts.quiet:
            c = s["counts"]
            err.print(
                f"camcli: {c['ok']} of {c['images']} images explained with {', '.join(s['options']['method'])} "
                f"at layer {s['model']['layer']}; summary: {result.summary_path}",
                highlight=False,
            )
            for im in s["images"]:
                if im["status"] != "ok":
                    err.print(f"camcli: error: {im['error']}", highlight=False, markup=False)
        return result.exit_code

    code = _run(go)
    raise typer.Exit(int(code))


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="The check file (YAML).", show_default=False)],
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    json_report: Annotated[Optional[Path], typer.Option("--json", help="Write a JSON report here.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write an overlay per case with its region drawn.")] = None,
    update_baselines: Annotated[bool, typer.Option("--update-baselines", help="Compute and store baseline maps; report changes.")] = False,
) -> None:
    """Check that a model still looks where it should. Exit 0: all pass, 1: a case failed, 2: bad file.

    Example: camcli check configs/check-example.yaml --junit report.xml --out check-overlays/
    """
    from camcli.check import junit_xml, run_check
    from camcli.writer import write_atomic

    def go() -> ExitCode:
        report = run_check(file, update_baselines=update_baselines, out=out_dir)
        console = _stdout()
        if update_baselines:
            table = Table(title=f"camcli check --update-baselines: {file}")
            for col in ("case", "method", "status", "similarity to previous", "file"):
                table.add_column(col)
            for b in report.baselines:
                sim = "-" if b["similarity_to_previous"] is None else f"{b['similarity_to_previous']:.4f}"
                table.add_row(b["case"], b["method"], b["status"], sim, b["path"])
            console.print(table)
            changed = sum(1 for b in report.baselines if b["status"] != "unchanged")
            err.print(f"camcli: {len(report.baselines)} baselines written, {changed} new or changed", highlight=False)
            return ExitCode.OK
        table = Table(title=f"camcli check: {file} (layer {report.layer})")
        for col in ("case", "method", "rule", "value", "bound", "result", "note"):
            table.add_column(col, overflow="fold")
        for r in report.rules:
            table.add_row(
                escape(r.case), r.method, r.rule, escape(str(r.value)), escape(str(r.bound)),
                "[green]pass[/]" if r.passed else "[bold red]FAIL[/]", escape(r.message),
            )
        console.print(table)
        if junit is not None:
            write_atomic(junit, junit_xml(report))
        if json_report is not None:
            write_atomic(json_report, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
        failed = sum(1 for r in report.rules if not r.passed)
        verdict = "all rules passed" if report.passed else f"{failed} of {len(report.rules)} rules FAILED"
        err.print(f"camcli check: {verdict}", highlight=False)
        return report.exit_code

    raise typer.Exit(int(_run(go)))


@app.command()
def evaluate(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    method: Annotated[str, typer.Option("--method", "-M", help="Comma-separated methods to compare.")] = "gradcam",
    metric: Annotated[Optional[str], typer.Option("--metric", help="Comma-separated metrics (default: all; box metrics need --boxes).")] = None,
    boxes: Annotated[Optional[str], typer.Option("--boxes", help="JSON/YAML map from image to boxes [x0, y0, x1, y1] in pixels.")] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    labels: LabelsOpt = None,
    unsafe_load: UnsafeOpt = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Dotted module path; default: last spatial layer.")] = None,
    classes: Annotated[Optional[str], typer.Option("--class", "-c", help="One class per image: top1, an index or a label.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Deletion/insertion curve steps.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Seed for ROAD noise, the random baseline and re-initialisation.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Perturbed images per forward pass.")] = 16,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Folder for evaluation.json and plots.")] = "camcli-eval",
    plots: Annotated[bool, typer.Option("--plots", help="Also write deletion/insertion curve PNGs.")] = False,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subfolders.")] = False,
    device: DeviceOpt = None,
    image_size: ImageSizeOpt = None,
) -> None:
    """Measure how faithful each method is on your images, next to random and centre baselines.

    Example: camcli evaluate sample_images/ --method gradcam,gradcam++,scorecam --steps 50 --plots
    """
    from camcli.evaluate import BASELINES, EvaluateOptions
    from camcli.evaluate import evaluate as run_evaluate
    from camcli.metrics import HIGHER_IS_BETTER

    def go() -> ExitCode:
        opts = EvaluateOptions(
            method=method, metric=metric, boxes=boxes, model=model, weights=weights, labels=labels,
            unsafe_load=bool(unsafe_load), layer=layer, classes=classes, steps=steps, seed=seed,
            batch_size=batch_size, out=out_dir, plots=plots, recursive=recursive, device=device or "auto",
            image_size=image_size,
        )
        res = run_evaluate(paths, opts)
        wanted = list(next(iter(res.aggregate.values())))
        table = Table(title="camcli evaluate: mean ± std over images (red: not better than both baselines)")
        table.add_column("method")
        for mname in wanted:
            table.add_column(f"{mname} {'↑' if HIGHER_IS_BETTER[mname] else '↓'}", overflow="fold")
        for name, row in res.aggregate.items():
            cells = []
            for mname in wanted:
                st = row[mname]
                if st["mean"] is None:
                    cells.append("-")
                    continue
                text = f"{st['mean']:.3f} ± {st['std']:.3f}"
                if name not in BASELINES and st.get("beats_baselines") is False:
                    text = f"[red]{text}[/]"
                cells.append(text)
            table.add_row(f"[dim]{name}[/]" if name in BASELINES else name, *cells)
        _stdout().print(table)
        err.print(f"camcli: wrote {res.path}", highlight=False)
        for im in res.images:
            if im["status"] != "ok":
                err.print(f"camcli: error: {im['error']}", highlight=False, markup=False)
        return res.exit_code

    raise typer.Exit(int(_run(go)))


@app.command()
def methods(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the registered CAM methods: aliases, gradients, extra forward passes, paper."""
    from camcli.methods import available_methods

    rows = [
        {
            "name": m.name,
            "aliases": list(m.aliases),
            "needs_gradients": m.needs_gradients,
            "extra_forwards_per_image": m.extra_forwards,
            "class_specific": m.needs_target,
            "description": m.description,
            "paper": m.paper,
        }
        for m in available_methods()
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="camcli methods")
    for col in ("name", "aliases", "gradients", "extra forwards", "description", "paper"):  # gradients: to the layer
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], ", ".join(r["aliases"]), "yes" if r["needs_gradients"] else "no",
            r["extra_forwards_per_image"], r["description"], r["paper"],
        )
    _stdout().print(table)


@app.command()
def layers(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    unsafe_load: UnsafeOpt = None,
    image_size: ImageSizeOpt = None,
    all_layers: Annotated[bool, typer.Option("--all", help="Also list layers without a spatial output.")] = False,
) -> None:
    """Print the model's module tree with output shapes; marks the default target layer."""
    import torch

    from camcli.layers import default_layer, trace_layers
    from camcli.models import load_model
    from camcli.models.load import architecture_weights

    def go() -> None:
        # Shapes do not depend on weights: library architectures are inspected untrained.
        lm = load_model(model, weights or architecture_weights(model), unsafe_load=bool(unsafe_load), image_size=image_size)
        infos = trace_layers(lm.module, torch.zeros(1, 3, lm.input_size, lm.input_size))
        default = default_layer(infos)
        table = Table(title=f"{lm.name}: layers (input 1x3x{lm.input_size}x{lm.input_size})")
        for col in ("layer", "type", "output shape", "layout", ""):
            table.add_column(col)
        for i in infos:
            if not all_layers and not i.spatial and i.name != default:
                continue
            shape = "x".join(map(str, i.shape)) if i.shape else "-"
            table.add_row(i.name, i.type, shape, i.layout_text, "default" if i.name == default else "")
        _stdout().print(table)

    _run(go)


@app.command()
def models() -> None:
    """List the bundled models and the other sources camcli accepts."""
    from camcli.models import available_models

    table = Table(title="camcli models")
    table.add_column("model")
    table.add_column("description", overflow="fold")
    for name, desc in available_models().items():
        table.add_row(name, desc)
    table.add_row("<torchvision name>", "e.g. resnet50, vgg16, convnext_tiny: with --weights FILE (or torchvision's local cache)")
    table.add_row("<timm name>", "e.g. resnet18d, efficientnet_b0: with --weights FILE (or timm's local cache)")
    table.add_row("module:callable", "any Python callable returning an nn.Module; --weights optional")
    _stdout().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
