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
    loss = result.get("final_val_loss")
    console.print(
        f"[bold]{result['status']}[/bold] run {result['run_id']} in {folder}: "
        f"final val loss {loss if loss is None else f'{loss:.4f}'}, "
        f"train loss {result['final_train_loss']:.4f}, {result['steps']} steps, {result['wall_s']:.1f} s"
    )
    if result["status"] == "failed":
        raise typer.Exit(1)


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
