"""The runner of the user's own code: a Python callable or a command (docs/design.md#runs-of-your-code).

The run's frozen config.yaml holds the user's keys and the resolved `run` block. A callable is called as
`function(cfg, run_dir)` in the run's folder `run.cwd`, with `run.path` first on sys.path; a command runs
in a shell there, its `{overrides}`, `{config}` and `{run_dir}` expanded, its output copied to this
attempt's log. The result is the dict the callable returns, else the run folder's result.json as the
user's code wrote it, else the last JSON object the command printed. hpt checks it (a final loss is
required) and writes the result.json of the contract, with the failure and the log's tail when it fails.
"""

import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import hptransfer
from hptransfer.config import user
from hptransfer.errors import HptError
from hptransfer.files import append_lines, write_json_atomic
from hptransfer.provenance import git_state
from hptransfer.sweeps.store import read_metrics, result_type_problem

HEARTBEAT_S = 30.0  # well inside backends.base.HEARTBEAT_STALE_S
TAIL_LINES = 20
CONTRACT = "return (or print as the last JSON line, or write to result.json) {'final_val_loss': ...}"


class RunFailed(Exception):
    """The user's code failed or gave no usable result; the message says which and what to do."""


def run(run_dir: Path) -> dict[str, Any]:
    """Run the user's code for this run folder; the result record (also written to result.json).

    In a task of a multi-task SLURM job (torch's RANK set, > 0) the code runs as one rank of the run and its
    result is rank 0's: this task writes nothing to the folder and returns only its status.
    """
    t0 = time.time()
    frozen = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    spec = frozen["run"]
    main = os.environ.get("RANK", "0") == "0"
    try:
        with _heartbeat(run_dir) if main else nullcontext():
            raw = _call(spec, frozen, run_dir) if spec["target"] else _command(spec, frozen, run_dir)
        if not main:
            return {"status": "completed"}
        result = _contract(raw if raw is not None else _written(run_dir, _missing(spec)), run_dir)
    except (RunFailed, HptError) as err:
        result = _failed(str(err))
    except Exception:  # the user's callable raised: its traceback is the error
        result = _failed(traceback.format_exc().rstrip())
    if not main:
        return result
    result.update(run_id=run_dir.name, sweep=run_dir.parent.name, wall_s=time.time() - t0, env=_env(spec))
    write_json_atomic(run_dir / "result.json", result)
    return result


def _missing(spec: dict[str, Any]) -> str:
    """What a run that gave no result is told."""
    if spec["target"]:
        return f"{spec['target']} returned None and wrote no result.json: {CONTRACT}"
    return f"the command printed no JSON object and wrote no result.json: {CONTRACT}"


def _call(spec: dict[str, Any], frozen: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The callable's return value (None: look for the result.json it wrote)."""
    fn = user.import_object(spec["target"], spec["path"], "run.target")
    if not callable(fn):
        raise RunFailed(f"run.target '{spec['target']}' is not callable")
    os.chdir(spec["cwd"])  # a job runs one run: its working folder is the project's, as for a command
    out = fn(OmegaConf.create(user.user_keys(frozen)), run_dir)
    if out is not None and not isinstance(out, dict):
        raise RunFailed(f"{spec['target']} returned a {type(out).__name__}, not a dict: {CONTRACT}")
    return out


def _command(spec: dict[str, Any], frozen: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The last JSON object the command printed, unless it wrote result.json (then None: that file is read)."""
    line = (spec["command"]
            .replace("{overrides}", " ".join(shlex.quote(o) for o in user.overrides(frozen)))
            .replace("{config}", shlex.quote(str(run_dir / "config.yaml")))
            .replace("{run_dir}", shlex.quote(str(run_dir))))
    env = {**os.environ, "HPT_RUN_DIR": str(run_dir), "HPT_RUN_ID": run_dir.name, "HPT_SWEEP": run_dir.parent.name,
           # `python` is the interpreter running hpt (its environment), and run.path is importable
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), *filter(None, [os.environ.get("PATH")])]),
           "PYTHONPATH": os.pathsep.join([*spec["path"], *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"hpt: running in {spec['cwd']}: {line}", flush=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last: dict[str, Any] | None = None
    # stderr joins stdout: the log keeps their order, and a failure's tail holds the traceback
    with subprocess.Popen(line, shell=True, cwd=spec["cwd"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace") as proc:
        for text in proc.stdout:
            sys.stdout.write(text)
            tail.append(text.rstrip("\n"))
            if text.lstrip().startswith("{"):
                try:
                    obj = json.loads(text)
                except ValueError:
                    continue
                last = obj if isinstance(obj, dict) else last
        sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        raise RunFailed(f"the command exited with status {code}; the last lines of its output:\n" + "\n".join(tail))
    return None if (run_dir / "result.json").exists() else last


def _written(run_dir: Path, missing: str) -> dict[str, Any]:
    """The result the user's code wrote to the run folder's result.json."""
    try:
        data = json.loads((run_dir / "result.json").read_text())
    except FileNotFoundError:
        raise RunFailed(missing) from None
    except (OSError, ValueError) as err:
        raise RunFailed(f"the result.json your code wrote cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise RunFailed(f"the result.json your code wrote is not an object: {CONTRACT}")
    return data


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def _contract(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The user's result as the contract's record: a final loss required, the curve into metrics.jsonl."""
    status = raw.get("status", "completed")
    if status not in ("completed", "diverged"):
        raise RunFailed(f"the result's status is {status!r}: use 'completed' or 'diverged' (or leave it out)")
    val, train = _number(raw.get("final_val_loss")), _number(raw.get("final_train_loss"))
    if status == "completed" and val is None and train is None:
        raise RunFailed(f"the result has no final loss (a finite final_val_loss or final_train_loss): {CONTRACT}")
    out = {k: v for k, v in raw.items() if k not in ("curve", "run_id", "sweep", "env", "error")}
    out.update(status=status, final_val_loss=val, final_train_loss=train)
    out.setdefault("diverged_at_step", None)
    wrong = result_type_problem(out)
    if wrong:
        raise RunFailed(f"the result's {wrong}")
    if raw.get("curve") is not None:
        _write_curve(raw["curve"], run_dir)
    return out


def _write_curve(curve: Any, run_dir: Path) -> None:
    """The result's curve {steps: [...], losses: [...]} as metrics.jsonl, unless the code wrote that file."""
    steps, losses = (curve.get("steps"), curve.get("losses")) if isinstance(curve, dict) else (None, None)
    if not (isinstance(steps, list) and isinstance(losses, list) and len(steps) == len(losses)
            and all(isinstance(s, int) for s in steps)):
        raise RunFailed("the result's curve must be {'steps': [int, ...], 'losses': [float, ...]} of equal length")
    if read_metrics(run_dir)[0]:
        return
    append_lines(run_dir / "metrics.jsonl", "".join(json.dumps({"step": s, "loss": _number(v)}) + "\n"
                                                    for s, v in zip(steps, losses, strict=True)))


def _failed(error: str) -> dict[str, Any]:
    print(f"hpt: run failed: {error.splitlines()[0]}", file=sys.stderr, flush=True)  # the rest is above it
    return {"status": "failed", "final_train_loss": None, "final_val_loss": None, "error": error}


def _env(spec: dict[str, Any]) -> dict[str, Any]:
    torch = sys.modules.get("torch")  # the callable's torch, when it used one; a command's is its own
    return {"torch": getattr(torch, "__version__", None), "hptransfer": hptransfer.__version__,
            "python": platform.python_version(), "host": socket.gethostname(), **git_state(spec["cwd"])}


@contextmanager
def _heartbeat(run_dir: Path) -> Iterator[None]:
    """heartbeat.json every HEARTBEAT_S while the user's code runs (its step: metrics.jsonl's last, if any)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            records, _ = read_metrics(run_dir)
            step = records[-1]["step"] if records else 0
            with suppress(OSError):  # a full disk: the run goes on; its status falls back to the scheduler's word
                write_json_atomic(run_dir / "heartbeat.json", {"pid": os.getpid(), "host": socket.gethostname(),
                                                               "step": step, "time": time.time()})
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
