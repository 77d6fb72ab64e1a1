"""Runs per hour of a whole sweep: one run per job (unfused), fused groups, and packed tasks.

Each mode runs the same real `hpt sweep` (the `make demo` grid by default: conf/width.yaml, 84 runs) into its
own fresh folder and is timed from the command's start to its end: process start-ups, data loading, training,
evaluation and the result files, as a user waits for them. Then every mode's results are checked against the
unfused ones: the same run ids, and the largest difference in final validation loss.

    python bench/sweep_throughput.py                      # the demo grid on this machine's CPUs
    python bench/sweep_throughput.py --quick              # one seed, widths 32 and 64 (28 runs)
    python bench/sweep_throughput.py --gpu                # GPU scale: widths 256-1024, 12 layers, 1 GPU
    python bench/sweep_throughput.py --modes unfused,fused train.steps=100
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HPT = str(Path(sys.executable).with_name("hpt"))
MODES = {
    "unfused": ["launcher.fuse=1", "launcher.runs_per_task=1"],
    "fused": ["launcher.fuse=auto"],
    "packed": ["launcher.runs_per_task=8"],
}
QUICK = ["sweep.seeds=[0]", "model.width=32,64"]
# The 124M-class depth at GPU widths: 12 layers of head size 64, widths 256-1024, bf16 autocast, short runs.
GPU = ["model.n_layers=12", "model.head_dim=64", "param.base_width=256", "model.width=256,512,1024",
       "train.batch_size=32", "train.seq_len=256", "train.steps=200", "train.device=cuda", "sweep.seeds=[0]",
       "optim.lr=tag(log2,range(-10,-5))"]


def run_mode(name: str, extra: list[str], keep: Path | None) -> tuple[float, Path, str]:
    root = Path(tempfile.mkdtemp(prefix=f"hpt-bench-{name}-", dir=keep))
    t = time.perf_counter()
    proc = subprocess.run([HPT, "sweep", str(REPO / "conf" / "width.yaml"), "--root", str(root), *extra],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{name}: hpt sweep failed:\n{proc.stdout}\n{proc.stderr}")
    said = next((ln for ln in proc.stdout.splitlines() if "fused into" in ln or "jobs of up to" in ln), "")
    return wall, root / "width", said.split(": ", 1)[-1]


def results(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/result.json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="unfused,fused,packed", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--quick", action="store_true", help=f"a smaller grid: {' '.join(QUICK)}")
    ap.add_argument("--gpu", action="store_true", help="the GPU-scale grid (one GPU per job)")
    ap.add_argument("--keep", type=Path, help="keep each mode's sweep folder under this folder")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every mode")
    args = ap.parse_args()
    common = [*(QUICK if args.quick else []), *(GPU if args.gpu else []), *args.overrides]
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(f"grid: conf/width.yaml {' '.join(common)}", flush=True)
    print(f"{'mode':<8} {'runs':>5} {'wall s':>8} {'runs/hour':>10} {'speed-up':>9} {'max |d val loss|':>17}  how",
          flush=True)
    base: dict[str, dict] | None = None
    base_rate = None
    for name in args.modes.split(","):
        wall, folder, said = run_mode(name, [*common, *MODES[name]], args.keep)
        res = results(folder)
        rate = len(res) / wall * 3600
        base_rate = base_rate or rate
        if base is None:
            base, diff = res, 0.0
        else:
            if set(res) != set(base):
                sys.exit(f"{name}: run ids differ from the first mode's")
            diff = max((abs(r["final_val_loss"] - base[k]["final_val_loss"]) for k, r in res.items()
                        if r["final_val_loss"] is not None and base[k]["final_val_loss"] is not None), default=0.0)
        print(f"{name:<8} {len(res):>5} {wall:>8.1f} {rate:>10.0f} {rate / base_rate:>8.2f}x {diff:>17.2e}  "
              f"{said or 'one run per job'}", flush=True)
        if not args.keep:
            shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
