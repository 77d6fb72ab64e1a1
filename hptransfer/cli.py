"""The `hpt` command line: thin Typer commands that parse, call the library, and render with rich."""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from hptransfer.errors import HptError

app = typer.Typer(
    help="Find a large model's hyperparameters by tuning small ones.\n\n"
    "Sweep small models along width, depth, batch size or duration under several "
    "parameterizations, collect the final losses, and measure how well the optimum transfers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

@app.callback()
def _root() -> None:
    """Keeps `hpt` a command group even while it has a single command."""


Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Hydra overrides, e.g. model.width=256 param=mup optim.lr=0.01", show_default=False),
]


@app.command()
def train(
    overrides: Overrides = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run folder (default: runs/train/<run_id>).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train one model in this process and write config.yaml, metrics.jsonl and result.json.

    Example: hpt train model.width=256 param=mup optim.lr=0.01 train.steps=300
    A diverged run (non-finite loss or loss above train.diverge_factor x its initial value)
    stops early with status 'diverged' and exit code 0: it is a result, not an error.
    """
    from hptransfer.config import compose_run
    from hptransfer.train.loop import default_run_dir, run_training

    cfg = compose_run(overrides)
    folder = run_dir or default_run_dir(cfg)
    result = run_training(cfg, folder, progress=not quiet)
    if result["status"] == "failed":
        err_console.print(result["error"].rstrip(), highlight=False)
        raise typer.Exit(1)

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    console.print(
        f"[bold]{result['status']}[/bold] run {result['run_id']} in {folder}: "
        f"val loss {fmt(result['final_val_loss'])}, train loss {fmt(result['final_train_loss'])}, "
        f"{result['steps']} steps, {result['wall_s']:.1f} s", highlight=False,
    )


@app.command()
def params(
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show what the parameterization does to every parameter tensor.

    One row per tensor: shape, class (E embedding, H hidden, R readout, V vector-like),
    width multiplier m, init std, forward multiplier, learning rate, weight decay, Adam epsilon.
    Example: hpt params param=mup model.width=512 param.base_width=128
    """
    import dataclasses
    import json

    from hptransfer.config import compose_run
    from hptransfer.train.model import param_specs

    specs = param_specs(compose_run(overrides))
    if as_json:
        print(json.dumps([dataclasses.asdict(s) for s in specs.values()], indent=1))
        return
    from rich.table import Table

    table = Table("tensor", "shape", "class", "m", "init std", "fwd mult", "lr", "weight decay", "eps",
                  box=None, header_style="bold")
    for s in specs.values():
        std = "ones" if s.init_std is None else f"{s.init_std:.4g}"
        table.add_row(s.name, "x".join(map(str, s.shape)), s.cls, f"{s.width_mult:g}", std, f"{s.fwd_mult:.4g}",
                      f"{s.lr:.4g}", f"{s.weight_decay:.4g}", f"{s.eps:.3g}")
    # Piped output gets a wide console: tensor names must not be cut.
    (console if console.is_terminal else Console(width=200)).print(table)


Results = Annotated[
    list[Path], typer.Argument(help="results.parquet from `hpt collect` (several are joined).", show_default=False)
]
Metric = Annotated[str, typer.Option("--metric", help="The loss column to minimize.")]
Params = Annotated[list[str] | None, typer.Option("--param", help="Only this parameterization (repeatable).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of tables.")]


@app.command()
def analyze(
    results: Results,
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: <results>_report beside the table).")
    ] = None,
    metric: Metric = "final_val_loss",
    param: Params = None,
    axis: Annotated[
        list[str] | None, typer.Option("--axis", help="Only this axis: width, depth, batch_size, tokens (repeatable).")
    ] = None,
    boot: Annotated[int, typer.Option("--boot", help="Bootstrap resamples over seeds (0: no interval).")] = 200,
    as_json: AsJson = False,
) -> None:
    """Find the best learning rate per scale, its law, and which parameterization transfers best.

    Groups runs by parameterization and scaling axis (width, depth, batch
    size, tokens), every other hyperparameter fixed. Per scale: the optimum
    of a quadratic in log2(lr) and of an Akima spline; diverged runs dropped
    (drawn as crosses); edge optima flagged with the learning rates to add;
    a seed-bootstrap interval. Per group: the law log lr* = log a + b log s
    (b: log2 per doubling), its fit quality, the loss cost of a mis-set LR,
    the asymptotic loss. Writes report.md, summary.json and figures to --out.

    Examples:
      hpt analyze results.parquet
      hpt analyze results.parquet --param sp --param mup --out report/
      hpt analyze results.parquet --json | jq '.groups[] | [.label, .law.b]'
    """
    import json

    from hptransfer.analysis.analyze import analyze as run_analysis
    from hptransfer.analysis.load import AXES, load_results
    from hptransfer.analysis.report import print_terminal, write_report

    unknown = [a for a in axis or [] if a not in AXES]
    if unknown:
        raise HptError(f"--axis {unknown[0]}: not one of {', '.join(AXES)}")
    df = load_results(results, metric)
    analysis = run_analysis(df, metric, params=param, axes=axis, n_boot=max(boot, 0))
    folder = out or results[0].with_name(f"{results[0].stem}_report")
    summary = write_report(analysis, folder, results)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print_terminal(summary, console if console.is_terminal else Console(width=200), folder)


@app.command()
def predict(
    results: Results,
    at: Annotated[str, typer.Option("--at", help="Target scale: width=4096, depth=48, batch_size=512, tokens=2e10.")],
    param: Params = None,
    metric: Metric = "final_val_loss",
    as_json: AsJson = False,
) -> None:
    """Predict a large run's learning rate from a sweep's transfer law, and how to launch it.

    Evaluates the law log lr* = log a + b log s of each group on the target's
    axis at the target, with a 95% interval from the law's uncertainty. For a
    width target, also each parameter class's learning rate (eta * gamma_X *
    m^-c_X, the abc table). Prints the `hpt train` line for the run, with the
    group's non-default settings.

    Examples:
      hpt predict results.parquet --at width=4096 --param mup
      hpt predict results.parquet --at tokens=2e10 --json
    """
    import json

    from hptransfer.analysis.load import load_results
    from hptransfer.analysis.predict import as_dict, render
    from hptransfer.analysis.predict import predict as run_predict

    predictions = run_predict(load_results(results, metric), at, metric, params=param)
    if as_json:
        print(json.dumps([as_dict(p) for p in predictions], indent=1))
    else:
        render(predictions, console if console.is_terminal else Console(width=200))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except HptError as err:
        err_console.print(f"[red]hpt: error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("hpt: interrupted")
        sys.exit(130)
