"""Distributed training throughput: tokens/s per process and scaling efficiency at 1, 2, ... processes.

Each count of processes is one torchrun launch (hptransfer.train.dist.launch, as `hpt train --nproc N`) of
this file's worker: the model, optimizer, batches and wrapping (train.parallel) are built as training builds
them (train.step.setup in the run's process group), and the timed step is the training loop's step on this
rank's rows, its losses averaged over the ranks at the end of each window as the loop does at log steps.
On a CPU the processes use gloo and share the cores (1 process: all of them as threads; N: cores / N each);
on a GPU machine NCCL, one process per GPU. The figure is the median of `--windows` timed windows.

Scaling is weak by default: every process trains `--batch-size` rows, so N processes train a global batch N
times larger and perfect scaling keeps tokens/s per process constant. `--strong` holds the global batch at
`--batch-size` instead (each of N processes trains 1/N of it), as a given run's config does.
Efficiency = tokens/s per process at N / tokens/s at 1.

Examples:
  python bench/scaling.py                                       # CPU: 1 and 2 processes, DDP
  python bench/scaling.py --threads 1                           # each process one thread: per-process scaling
  python bench/scaling.py --parallel fsdp --strong --batch-size 32
  python bench/scaling.py --device cuda --procs 1,2,4,8 --width 768 --n-layers 12 --seq-len 1024 \\
      --batch-size 8 model.head_dim=64 data.vocab_size=50304    # NCCL, one process per GPU
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import steps_of
from hptransfer.errors import HptError
from hptransfer.files import exit_process
from hptransfer.train.data import make_batches
from hptransfer.train.dist import World, die_with_launcher, global_mean, launch, process_group
from hptransfer.train.optim import lr_factor, set_lr
from hptransfer.train.rules import apply_rules
from hptransfer.train.step import pick_device, setup, train_step


def worker(overrides: list[str], steps: int, windows: int, warmup: int, threads: int | None, out: Path) -> None:
    """One process of a launch: time the training step; rank 0 writes {tokens_per_s, ...} to `out`."""
    die_with_launcher()
    if threads:
        torch.set_num_threads(threads)
    world = World.from_env()  # one process: train.parallel is not used, the model is the single process's
    cfg = compose_run([*overrides, f"train.steps={(warmup + windows) * steps}"])
    eff, _ = apply_rules(cfg)
    batches = make_batches(cfg)
    total = steps_of(cfg.train)
    with process_group(world, pick_device(cfg), cfg.train.dist_timeout_s) as device:
        s = setup(eff, device, world=world)
        times = []
        for w in range(warmup + windows):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            pending = []
            for step in range(w * steps, (w + 1) * steps):
                set_lr(s.opt, lr_factor(step, total, eff))
                pending.append(train_step(s, *batches.train_batch(step, device, s.rows)))
            loss = global_mean(torch.stack(pending).double(), world)[-1].item()  # the loop's log step: a host sync
            if w >= warmup:
                times.append(time.perf_counter() - t0)
    window_s = statistics.median(times)
    if world.is_main:
        out.write_text(json.dumps({
            "tokens_per_s": steps * cfg.train.batch_size * cfg.train.seq_len / window_s,
            "ms_per_step": 1e3 * window_s / steps, "threads": torch.get_num_threads(), "loss": loss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default=None,
                    help="comma-separated process counts (default: 1,2 on a CPU; 1, 2, 4 ... up to the GPUs)")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per process (--strong: in all; default 16)")
    ap.add_argument("--strong", action="store_true", help="hold the global batch, not each process's")
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed window (default: 10)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (default: 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed windows first (default: 1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per process (default: the cores shared out, as hpt train --nproc does)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a launched process: where rank 0 reports
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.mlp=swiglu model.head_dim=64")
    args = ap.parse_args()
    overrides = [f"model.width={args.width}", f"model.n_layers={args.n_layers}", f"train.seq_len={args.seq_len}",
                 f"train.device={args.device}", f"train.parallel={args.parallel}", *args.overrides]
    if args.worker:
        worker(overrides, args.steps, args.windows, args.warmup, args.threads, args.worker)
        exit_process(0)
    try:  # bad flags or overrides fail here, in one line, before any launch
        cfg = compose_run([*overrides, f"train.batch_size={args.batch_size}"])
        device = pick_device(cfg)
    except HptError as err:
        ap.error(str(err))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    procs = [int(n) for n in args.procs.split(",")] if args.procs else (
        [n for n in (1, 2, 4, 8, 16) if n <= gpus] if gpus else [1, 2])
    m = cfg.model
    print(f"{'weak' if not args.strong else 'strong'} scaling, {args.parallel}, {device.type}: {cfg.param.name}, "
          f"width {m.width}, {m.n_layers} layers, seq {args.seq_len}, {args.batch_size} rows "
          f"{'per process' if not args.strong else 'in all'}; median of {args.windows} windows x {args.steps} steps")
    print(f"{'processes':>9} {'threads':>7} {'global batch':>12} {'tokens/s':>10} {'per process':>11} "
          f"{'ms/step':>8} {'efficiency':>10}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in procs:
            batch = args.batch_size if args.strong else args.batch_size * n
            out = Path(tmp) / f"{n}.json"
            code = launch(n, [__file__, "--worker", str(out), "--steps", str(args.steps), "--windows",
                              str(args.windows), "--warmup", str(args.warmup),
                              *(["--threads", str(args.threads)] if args.threads else []), *overrides,
                              f"train.batch_size={batch}"])
            if code or not out.exists():
                sys.exit(f"scaling: the {n}-process launch failed (exit code {code}): see its output above")
            r = json.loads(out.read_text())
            per = r["tokens_per_s"] / n
            base = base or per
            print(f"{n:>9} {r['threads']:>7} {batch:>12} {r['tokens_per_s']:>10,.0f} {per:>11,.0f} "
                  f"{r['ms_per_step']:>8.1f} {per / base:>10.0%}", flush=True)


if __name__ == "__main__":
    main()
