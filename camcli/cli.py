"""The command line: parse options, call the plain functions, print. No logic of its own."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import click
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from camcli import jsonout
from camcli import __version__
from camcli import options as O
from camcli.errors import CamcliError, ExitCode

class _Group(TyperGroup):
    """Options with an optional value (``--ray`` or ``--ray ADDRESS``) get their flag value when given bare."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in O.COMMANDS:
            args = [args[0], *O.fill_flag_values(args[0], args[1:])]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_Group,
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
    except KeyboardInterrupt as e:
        from camcli.signals import Interrupted, exit_code

        by = f" by {e.name}" if isinstance(e, Interrupted) else ""
        err.print(f"camcli: interrupted{by}; files written so far are complete, the rest were not started",
                  highlight=False)
        raise typer.Exit(exit_code(e)) from None


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


def _declared(command: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """The command takes its own parameters plus every option declared for it in camcli.options;
    those arrive in ``**given`` (None: not given on the command line)."""
    import inspect

    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        params = own + O.typer_parameters(command)
        fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return deco


def _quiet_warnings(quiet: bool | None) -> None:
    """-q: Python warnings (from torch, say) are messages too."""
    if quiet:
        warnings.simplefilter("ignore")


ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", help="YAML file with the same keys as these options; flags win.")
]


@app.command()
@_declared(O.EXPLAIN)
def explain(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary, with every image record, to stdout.")] = False,
    **given: Any,
) -> None:
    """Write overlay PNGs (and optional raw maps) plus records.jsonl and summary.json for images or folders.

    Example: camcli explain photos/ -r --method gradcam,layercam --class top3 --out heatmaps/
    """
    from camcli.pipeline import run_explain
    from camcli.progress import Progress

    _quiet_warnings(given.get("quiet"))

    def go() -> ExitCode:
        cfg = O.read_config(config, O.EXPLAIN) if config is not None else {}
        opts = O.build(O.EXPLAIN, cfg, given)
        with Progress(disable=opts.quiet) as bar:
            result = run_explain(paths, opts, progress=bar.update, on_start=bar.start)
        s = result.summary
        if as_json:
            sys.stdout.write(jsonout.dumps(result.with_records(), indent=2) + "\n")
        if not opts.quiet:
            c = s["counts"]
            err.print(
                f"camcli: {c['ok']} of {c['images']} images explained with {', '.join(s['options']['method'])} "
                f"at layer {s['model']['layer']}; summary: {result.summary_path}",
                highlight=False,
            )
            _print_errors(result.records())
        return result.exit_code

    code = _run(go)
    raise typer.Exit(int(code))


def _print_errors(records: Any) -> None:  # noqa: ANN401
    for im in records:
        if im["status"] != "ok":
            err.print(f"camcli: error: {im['error']}", highlight=False, markup=False)


@app.command()
def summary(
    target: Annotated[Path, typer.Argument(help="An --out folder (its records.jsonl) or a records file.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary with every image record included.")] = False,
    write: Annotated[bool, typer.Option("--write", help="Also write it as summary.json next to the records.")] = False,
) -> None:
    """Rebuild a run's summary from its records: counts, per-method aggregates, failed images.

    Works while the run is still going (without --write) and after it was killed.

    Example: camcli summary camcli-out/ --write
    """
    from camcli.records import bad_lines_warning, iter_records, rebuild, with_records

    def go() -> None:
        doc, path = rebuild(target, write=write)
        if bad := doc.get("unreadable_lines"):
            err.print(f"camcli: warning: {bad_lines_warning(path, bad['count'], bad['lines'])}", highlight=False,
                      markup=False)
        if as_json:
            sys.stdout.write(jsonout.dumps(with_records(doc, iter_records(path)), indent=2) + "\n")
            return
        out = _stdout()

        def say(text: str) -> None:
            out.print(text, highlight=False, markup=False)

        c, inputs = doc["counts"], doc.get("inputs") or {}
        say(f"{path}: run {doc['run_id'][:8]} started {doc['started']}, camcli {doc['camcli_version']}")
        say(f"model {doc['model']['name']}, layer {doc['model']['layer']}, methods {', '.join(doc['options']['method'])}")
        shard = f" (shard {inputs['shard']} of {inputs['total']} found)" if inputs.get("shard") else ""
        say(f"images: {c['images']} of {inputs.get('selected', '?')} planned{shard}: {c['ok']} ok, {c['error']} failed, "
            f"{c['reused']} reused, {c.get('not_processed', 0)} not processed")
        for method, by_layer in doc["aggregate"]["methods"].items():
            for layer, a in by_layer.items():
                say(f"{method} at {layer}: {a['maps']} maps, {a['empty']} empty, mean top-10% energy share "
                    f"{a['mean_top10_energy_share']:.3f}, mean value {a['mean_value']:.3f}")
        top = ", ".join(f"{t['label'] or t['index']} ({t['index']}): {t['images']}" for t in doc["aggregate"]["top1_classes"])
        if top:
            say(f"top-1 classes: {top}")
        _print_errors(iter_records(path))

    _run(go)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="The folder to write the merged records.jsonl and summary.json into.", show_default=False)],
    shards: Annotated[Optional[list[Path]], typer.Argument(help="Shard folders or records files (default: the shard records in OUT).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the merged summary with every image record included.")] = False,
) -> None:
    """Merge the records of the shards of one run into one records.jsonl and summary.json.

    Refuses shards whose options differ (naming the first that does); reports images missing from
    every shard and images done twice. Exit 3 when an image failed or is missing.

    Example: camcli merge heatmaps/      (after camcli explain ... --shard K/N --out heatmaps/)
    """
    from camcli.merge import merge as run_merge
    from camcli.merge import shown
    from camcli.records import iter_records, with_records

    def go() -> ExitCode:
        res = run_merge(out, shards or [])
        s = res.summary
        for w in res.warnings:
            err.print(f"camcli: warning: {w}", highlight=False, markup=False)
        if as_json:
            sys.stdout.write(jsonout.dumps(with_records(s, iter_records(res.records_path)), indent=2) + "\n")
        c = s["counts"]
        err.print(f"camcli merge: {s['merge']['shards']} shards -> {res.summary_path}: {c['images']} images, "
                  f"{c['ok']} ok, {c['error']} failed", highlight=False, markup=False)
        if res.missing:
            err.print(f"camcli: error: {len(res.missing)} images missing from every shard: {shown(res.missing)}; "
                      "rerun their shards with --skip-existing", highlight=False, markup=False)
        if res.absent_shards:
            err.print(f"camcli: error: no records for shard {', '.join(res.absent_shards)}: did those tasks run?",
                      highlight=False, markup=False)
        if res.duplicates:
            err.print(f"camcli: warning: {len(res.duplicates)} images done by more than one shard (the first record "
                      f"is kept): {shown(res.duplicates)}", highlight=False, markup=False)
        _print_errors(iter_records(res.records_path))
        return res.exit_code

    raise typer.Exit(int(_run(go)))


@app.command()
@_declared(O.CHECK)
def check(
    file: Annotated[Path, typer.Argument(help="The check file (YAML).", show_default=False)],
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    json_report: Annotated[Optional[Path], typer.Option("--json", help="Write a JSON report here.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write an overlay per case with its region drawn.")] = None,
    update_baselines: Annotated[bool, typer.Option("--update-baselines", help="Compute and store baseline maps; report changes.")] = False,
    **given: Any,
) -> None:
    """Check that a model still looks where it should. Exit 0: all pass, 1: a case failed, 2: bad file.

    The other options override the check file's keys of the same name.

    Example: camcli check configs/check-example.yaml --junit report.xml --out check-overlays/
    """
    from camcli.check import CheckReport, CheckStopped, check_report_path, junit_xml, run_check
    from camcli.progress import Progress
    from camcli.writer import write_report

    _quiet_warnings(given.get("quiet"))
    quiet = bool(given.get("quiet"))

    def write_reports(report: CheckReport) -> None:
        if junit is not None:
            write_report(junit, junit_xml(report))
        if json_report is not None:
            write_report(json_report, (jsonout.dumps(report.to_dict(), indent=2) + "\n").encode())

    def go() -> ExitCode:
        for flag, path in (("--junit", junit), ("--json", json_report)):
            if path is not None:
                check_report_path(flag, path)
        try:
            with Progress(disable=quiet, unit="case") as bar:  # a bar on a terminal, not with -q
                report = run_check(file, update_baselines=update_baselines, out=out_dir, overrides=given,
                                   progress=bar.update, on_start=bar.start)
        except CheckStopped as stopped:  # the reports say what was done, and that the rest was not
            write_reports(stopped.report)
            raise stopped.cause from None
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
            if not quiet:
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
        write_reports(report)
        failed = sum(1 for r in report.rules if not r.passed)
        verdict = "all rules passed" if report.passed else f"{failed} of {len(report.rules)} rules FAILED"
        if not quiet:
            err.print(f"camcli check: {verdict}", highlight=False)
        return report.exit_code

    raise typer.Exit(int(_run(go)))


@app.command()
@_declared(O.EVALUATE)
def evaluate(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    config: ConfigOpt = None,
    **given: Any,
) -> None:
    """Measure how faithful each method is on your images, next to random and centre baselines.

    Example: camcli evaluate sample_images/ --method gradcam,gradcam++,scorecam --steps 50 --plots
    """
    from camcli.evaluate import BASELINES
    from camcli.evaluate import evaluate as run_evaluate
    from camcli.metric_registry import get_metric
    from camcli.progress import Progress

    _quiet_warnings(given.get("quiet"))

    def go() -> ExitCode:
        cfg = O.read_config(config, O.EVALUATE) if config is not None else {}
        opts = O.build(O.EVALUATE, cfg, given)
        with Progress(disable=opts.quiet) as bar:
            res = run_evaluate(paths, opts, progress=bar.update, on_start=bar.start)
        wanted = list(next(iter(res.aggregate.values())))
        table = Table(title="camcli evaluate: mean ± std over images (red: not better than both baselines)")
        table.add_column("method")
        for mname in wanted:
            table.add_column(f"{mname} {'↑' if get_metric(mname).higher_is_better else '↓'}", overflow="fold")
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
        if not opts.quiet:
            err.print(f"camcli: wrote {res.path}", highlight=False)
            for im in res.records():  # streamed from the records file
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
        sys.stdout.write(jsonout.dumps(rows, indent=2) + "\n")
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
@_declared(O.LAYERS)
def layers(
    all_layers: Annotated[bool, typer.Option("--all", help="Also list layers without a spatial output.")] = False,
    **given: Any,
) -> None:
    """Print the model's module tree with output shapes; marks the default target layer."""
    import torch

    from camcli.layers import default_layer, trace_layers
    from camcli.models import load_model
    from camcli.models.load import architecture_weights

    def go() -> None:
        opts = O.build(O.LAYERS, given)
        # Shapes do not depend on weights: library architectures are inspected untrained.
        lm = load_model(opts.model, opts.weights or architecture_weights(opts.model), unsafe_load=bool(opts.unsafe_load),
                        image_size=opts.image_size)
        infos = trace_layers(lm.module, torch.zeros(1, 3, lm.input_size, lm.input_size), opts.layout)
        default = default_layer(infos, lm.num_classes if lm.task == "segmentation" else None)
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
    from camcli.allocator import keep_heap_memory
    from camcli.signals import stop_on_signals

    keep_heap_memory()  # the command owns its process: batches reuse the heap instead of faulting pages in
    with stop_on_signals():  # SIGINT, SIGTERM, SIGHUP: stop in order, exit 128 + the signal's number
        app()


if __name__ == "__main__":
    main()
