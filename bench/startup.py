"""Start-up cost of each `hpt` command: the modules it imports before doing any work, and their time.

Each command imports its library inside its function (hptransfer/cli.py), so a quick command does
not pay for torch, Hydra or pandas. This prints, per command, the import time of what it imports
(median of --repeat fresh interpreters) and which heavy libraries it pulls in.

    python bench/startup.py [--repeat 5]
"""

import argparse
import json
import statistics
import subprocess
import sys

# What each command imports before its work starts (cli.py's `# per command` imports).
COMMANDS: dict[str, list[str]] = {
    "hpt --help": ["hptransfer.cli"],
    "hpt status": ["hptransfer.cli", "hptransfer.views", "hptransfer.sweeps.state", "hptransfer.sweeps.store"],
    "hpt collect": ["hptransfer.cli", "hptransfer.sweeps.collect", "hptransfer.sweeps.store"],
    "hpt sweep": ["hptransfer.cli", "hptransfer.views", "hptransfer.sweeps.launch", "hptransfer.sweeps.plan",
                  "hptransfer.sweeps.backends.local"],  # a local sweep; SLURM adds submitit (~0.1 s)
    "hpt analyze": ["hptransfer.cli", "hptransfer.analysis.analyze", "hptransfer.analysis.load",
                    "hptransfer.analysis.report"],
    "hpt train": ["hptransfer.cli", "hptransfer.config.compose", "hptransfer.train.loop"],
}
HEAVY = ("torch", "hydra", "pandas", "submitit", "matplotlib", "scipy", "pyarrow", "omegaconf")

PROBE = """
import importlib, json, sys, time
t = time.perf_counter()
for m in {modules!r}:
    importlib.import_module(m)
print(json.dumps({{"s": time.perf_counter() - t, "heavy": [h for h in {heavy!r} if h in sys.modules]}}))
"""


def measure(modules: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(modules=modules, heavy=HEAVY)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="fresh interpreters per command; the median is shown")
    args = ap.parse_args()
    print(f"{'command':<13} {'imports (s)':>11}  heavy libraries imported")
    for name, modules in COMMANDS.items():
        runs = [measure(modules) for _ in range(args.repeat)]
        median = statistics.median(r["s"] for r in runs)
        print(f"{name:<13} {median:>11.3f}  {', '.join(runs[0]['heavy']) or '-'}", flush=True)


if __name__ == "__main__":
    main()
