"""Orchestration at sweep scale: a 10,000-run grid, expanded, written, its status read, collected.

Three figures, each against the issue's target on a 2-core machine:
  1. expand + write: compose the sweep file, expand the grid, write the sweep folder (sweep.yaml,
     manifest.parquet, one config.yaml per run) without launching anything  (target < 3 s);
  2. `hpt status <sweep>` over 10,000 finished run folders                  (target < 1 s), with
     results.jsonl as the jobs leave it, and (no target) without it: every result.json read;
  3. `hpt collect` of them into Parquet                                      (target < 3 s).
Status and collect are timed in-process (the library calls the command makes) and as the real
command's wall time (a fresh interpreter: imports included). Each finished run folder is
fabricated as training leaves it: result.json, a 100-step metrics.jsonl, heartbeat.json,
logs/attempt-1.log, its queued/started/ended records in jobs.jsonl and its results.jsonl line. The files are in the
page cache (just written), as they are when status is run repeatedly on a live sweep.

    python bench/orchestration.py                 # in a temporary folder, removed afterwards
    python bench/orchestration.py --keep DIR      # keep the sweep folder in DIR
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from hptransfer import views
from hptransfer.sweeps import collect, launch, plan
from hptransfer.sweeps.state import run_states
from hptransfer.sweeps.store import RESULTS_INDEX, SweepFolder, index_entry, result_key

HPT = str(Path(sys.executable).with_name("hpt"))
TARGETS_S = {"expand": 3.0, "status": 1.0, "collect": 3.0}
CURVE_STEPS = 100  # as conf/width.yaml trains

# 10 widths x 25 learning rates x 2 parameterizations x 20 seeds = 10,000 runs.
SWEEP_FILE = """\
defaults:
  - config
  - _self_
model: {n_layers: 2, head_dim: 16}
param: {base_width: 32}
train: {steps: 100, batch_size: 16, seq_len: 64, log_every: 10, final_window: 10, val_batches: 8}
sweep:
  name: bench
  axis: {key: model.width, values: [32, 64, 96, 128, 160, 192, 224, 256, 288, 320]}
  grid:
    optim.lr: {log2: [-12, 0], step: 0.5}
    param: [sp, mup]
  seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
"""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cli_wall_s(*args: str) -> float:
    """Wall time of the real `hpt` command (output discarded); a failure is an error, not a figure."""
    t0 = time.perf_counter()
    proc = subprocess.run([HPT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"hpt {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return wall


def fabricate_results(folder: SweepFolder, runs: list[plan.Run]) -> None:
    """Every run finished, as training and the local launcher leave its folder (a few diverged)."""
    rng = random.Random(0)
    host, jobs, entries = socket.gethostname(), [], []
    for i, r in enumerate(runs):
        run_dir = folder.run_dir(r.run_id)
        diverged = rng.random() < 0.1
        losses = [5.6 * (1 - 0.5 * s / CURVE_STEPS) + 0.01 * rng.random() for s in range(CURVE_STEPS)]
        final = None if diverged else sum(losses[-10:]) / 10
        result = {
            "run_id": r.run_id, "sweep": folder.name, "status": "diverged" if diverged else "completed",
            "final_train_loss": final, "final_val_loss": final, "steps": CURVE_STEPS, "tokens": CURVE_STEPS * 1024,
            "batch_size": 16, "seq_len": 64, "n_params": 400_000, "n_params_non_embedding": 390_000,
            "flops": 2.4e12, "flops_formula": "6 * N * tokens + ...", "wall_s": 12.0, "tokens_per_s": 9000.0,
            "diverged_at_step": 40 if diverged else None, "initial_loss": losses[0],
            "effective": {"batch_rule": None, "duration_rule": None, "lr": r.point["optim.lr"], "beta1": 0.9,
                          "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0},
            "env": {"torch": "2.13.0", "device": "cpu", "hptransfer": "0.1.0", "python": "3.11", "host": host,
                    "git_commit": "0" * 40, "git_dirty": False},
        }
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": v}) + "\n" for s, v in enumerate(losses)))
        (run_dir / "heartbeat.json").write_text(json.dumps({"pid": 1, "host": host, "step": CURVE_STEPS,
                                                            "time": time.time()}))
        (run_dir / "logs" / "attempt-1.log").write_text("")
        entries.append(index_entry(result_key(run_dir), result, 1))
        job = {"run_id": r.run_id, "executor": "local", "job_id": f"local-{1000 + i}"}
        jobs += [{**job, "event": "queued", "job_id": None, "scheduler": {"pid": 1, "start": 1, "host": host}},
                 {**job, "event": "started", "pid": 1000 + i, "start": 1, "host": host, "attempt": 1},
                 {**job, "event": "ended", "returncode": 0}]
    folder.append_jobs(jobs)
    folder.index_results([e for e in entries if e])


def report(label: str, seconds: float, target: str | None) -> None:
    mark = "" if target is None else f"  target < {TARGETS_S[target]:.0f} s: " + (
        "met" if seconds < TARGETS_S[target] else "MISSED")
    print(f"  {label:<72} {seconds:7.2f} s{mark}", flush=True)


def machine(where: Path) -> str:
    """CPU model, cores, load and the file system: on a shared machine the figures move with both."""
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    fs = max((ln.split() for ln in Path("/proc/mounts").read_text().splitlines()
              if str(where.resolve()).startswith(ln.split()[1])), key=lambda f: len(f[1]), default=["?", "?", "?"])
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; sweep on {fs[2]} ({fs[1]})"


def bench(root: Path) -> None:
    print(f"machine: {machine(root)}")
    sweep_file = root / "bench.yaml"
    sweep_file.write_text(SWEEP_FILE)
    folder = SweepFolder(root / "runs" / "bench")

    os.sync()  # start from a clean page cache: earlier writes' flushing is no part of the figures
    t_load, spec = timed(lambda: plan.load(sweep_file))
    t_expand, runs = timed(lambda: plan.expand(spec))
    t_write, _ = timed(lambda: launch.prepare(folder, spec, runs))
    print(f"{len(runs):,}-run grid ({' x '.join(f'{len(d.values)} {d.key}' for d in spec.dims)})")
    report("1. expand + write the sweep folder and manifest", t_load + t_expand + t_write, "expand")
    report("   compose the sweep file (sweep.load)", t_load, None)
    report("   expand the grid (sweep.expand)", t_expand, None)
    report("   write sweep.yaml, manifest, config.yaml (launch.prepare)", t_write, None)

    t_fab, _ = timed(lambda: fabricate_results(folder, runs))
    print(f"fabricated {len(runs):,} finished run folders in {t_fab:.1f} s")
    os.sync()
    root_args = ("--root", str(folder.path.parent))

    # As jobs leave it, results.jsonl indexes every finished run: status stats each result.json and
    # reads that one file. Without it (a sweep from before the index) status reads every result.json
    # and logs/ folder once, and indexes them.
    for when in ("first", "later"):
        t_states, states = timed(lambda: run_states(folder, summaries=True))
        t_view, view = timed(lambda s=states: views.status_view({folder.name: s}, [folder], detail=True))
        with open(os.devnull, "w") as devnull:
            t_print, _ = timed(lambda v=view: Console(file=devnull, width=200).print(v))
        report(f"2. hpt status bench, {when} call (in-process: states + render + print)",
               t_states + t_view + t_print, "status")
        report("   run states (state.run_states)", t_states, None)
        report("   render and print the grids and the runs table", t_view + t_print, None)
    report("   hpt status bench (the command, wall time)", cli_wall_s("status", "bench", *root_args), "status")
    (folder.path / RESULTS_INDEX).unlink()
    report("   hpt status bench without results.jsonl (the command: reads every result)",
           cli_wall_s("status", "bench", *root_args), None)
    report("   hpt status (all sweeps, counts only; the command)", cli_wall_s("status", *root_args), "status")

    out = root / "results.parquet"
    t_collect, (table, _) = timed(lambda: collect.collect([folder]))
    t_parquet, _ = timed(lambda: collect.write(table, out))
    t_curves, _ = timed(lambda: collect.curves([str(folder.run_dir(r.run_id)) for r in runs]))
    report("3. hpt collect into Parquet (in-process)", t_collect + t_parquet, "collect")
    report("   rows: states, results, configs and curves (collect.collect)", t_collect, None)
    report("   of which: read the loss curves (collect.curves, timed alone)", t_curves, None)
    report("   write Parquet (collect.write)", t_parquet, None)
    report("   hpt collect (the command, wall time)", cli_wall_s("collect", "--out", str(out), *root_args), "collect")
    print(f"  ({table.num_rows:,} rows x {table.num_columns} columns, {out.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="build the sweep here and keep it (default: a temp dir)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the temp dir goes (default: the system's); the figures depend on that file "
                         "system: /dev/shm (memory) shows the cost of hpt's own work, a disk adds its own")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        bench(args.keep)
        return
    root = Path(tempfile.mkdtemp(prefix="hpt-bench-", dir=args.dir))
    try:
        bench(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
