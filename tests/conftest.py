"""Shared test helpers: run the real `hpt` console script, compose tiny configs."""

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HPT = str(Path(sys.executable).with_name("hpt"))
REPO = Path(__file__).resolve().parent.parent

# A model small enough that a 20-step run takes about a second on one CPU core.
TINY = ["model.width=32", "model.n_layers=1", "model.head_dim=16", "param.base_width=32", "param.base_depth=1",
        "train.batch_size=4", "train.seq_len=32", "train.steps=20", "train.log_every=5", "train.val_batches=2",
        "train.final_window=5"]


def hpt(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the installed `hpt` command; returns the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([HPT, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str) -> CliResult:
    """Run `hpt` in this process through its real entry point (`main`): fast, same exit codes and output."""
    from hptransfer.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    sys.argv = ["hpt", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess | CliResult, needle: str) -> None:
    """Bad input: exit 2, a single `hpt: error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpt: error:"), proc.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)  # two cores: keep tests from oversubscribing each other
