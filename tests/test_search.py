"""`hpt search`: a per-module search through the sweep engine, on a user callable with a planted optimum.

Each "run" is the user's function computing a bowl in log2 space (a process start, no training), so
these are end-to-end tests of the engine: run folders, job records, resume, the Optuna journal.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hptransfer.files import json_lines
from hptransfer.sweeps import search
from hptransfer.sweeps.store import SweepFolder, attempt_count
from tests.conftest import HPT, REPO, assert_one_line_error, cli, hpt

# The bowl's bottom is at a = 2, b = 1/4 (log2: 1, -2), value 1; b above fail_above diverges (or raises).
BOWL = '''
import math, time


def main(cfg, run_dir):
    time.sleep(cfg.delay)
    if cfg.b > cfg.fail_above:
        if cfg.mode == "raise":
            raise RuntimeError("boom")
        return {"status": "diverged", "final_val_loss": None}
    loss = (math.log2(cfg.a) - 1) ** 2 + (math.log2(cfg.b) + 2) ** 2 + 1
    # the transfer check's keys: a bowl in log2(lr) around 2^-3, lower for wider models, a little seed noise
    loss += (math.log2(cfg.lr) + 3) ** 2 / 10 - 0.1 * math.log2(cfg.width) + 0.001 * cfg.seed
    return {"final_val_loss": loss}
'''

SEARCH = '''
run:
  target: bowl:main
a: 1.0
b: 1.0
lr: 0.125
width: 8
seed: 0
delay: 0.0
fail_above: 100.0
mode: diverge
search:
  name: bowl
  space:
    a: {low: 0.0625, high: 16, log: true}
    b: {low: 0.0625, high: 16, log: true}
  budget: {generations: 7, population: 6}
  seeds: [0]
  strategy: {name: cmaes, seed: 1}
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "bowl.py").write_text(BOWL)
    (proj / "search.yaml").write_text(SEARCH)
    return proj


def run_search(project: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return hpt("search", str(project / "search.yaml"), "--root", str(root), "-j", "2", *args)


def logged(root: Path, name: str = "bowl") -> list[dict]:
    return search.generations(SweepFolder(root / name))


def test_the_search_finds_a_planted_optimum(project, tmp_path):
    root = tmp_path / "runs"
    proc = run_search(project, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gens = logged(root)
    assert len(gens) == 7 and all(len(g["trials"]) == 6 for g in gens)
    assert gens[0]["trials"][0]["params"] == {"a": 1.0, "b": 1.0}  # the first generation holds the base point
    best = search.best_trial(gens)
    assert best["value"] < 0.8, best  # the bowl's bottom: 1 - 0.3 (the width term; the lr term is 0 at 2^-3)
    assert abs(best["params"]["a"] / 2 - 1) < 0.25 and abs(best["params"]["b"] / 0.25 - 1) < 0.25, best
    folder = root / "bowl"
    for f in ("search.json", "study.journal", "generations.jsonl", "report.md", "best.png", "manifest.parquet"):
        assert (folder / f).exists(), f
    # the search folder is a sweep folder: hpt status and hpt collect see its runs
    status = json.loads(hpt("status", "bowl", "--root", str(root), "--json").stdout)
    assert status["bowl"]["counts"]["completed"] == len({r for g in gens for t in g["trials"] for r in t["run_ids"]})
    out = tmp_path / "r.parquet"
    assert hpt("collect", "--root", str(root), "--out", str(out)).returncode == 0
    shown = cli("search", "status", "bowl", "--root", str(root))
    assert shown.returncode == 0 and "best point" in shown.stdout and "a=2" in shown.stdout, shown.stdout
    data = json.loads(cli("search", str(project / "search.yaml"), "--status", "--json", "--root", str(root)).stdout)
    assert data["best"]["number"] == best["number"] and len(data["generations"]) == 7
    again = run_search(project, root)  # done: the same command runs nothing
    assert again.returncode == 0 and " completed " not in again.stdout, again.stdout
    assert sum(attempt_count(folder / r) for r in SweepFolder(folder).run_folders()) == len(
        SweepFolder(folder).run_folders())


def test_a_killed_search_resumes_and_never_runs_a_point_twice(project, tmp_path):
    root = tmp_path / "runs"
    args = ["delay=0.4", "search.budget.generations=3", "search.budget.population=4"]
    cmd = [HPT, "search", str(project / "search.yaml"), "--root", str(root), "-j", "2", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    folder = root / "bowl"
    deadline = time.time() + 120
    # Kill it in the second generation, once one of its runs has finished (the others run or wait).
    while time.time() < deadline and not (len(logged(root)) == 1 and len(list(folder.glob("*/result.json"))) > 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(logged(root)) == 1, "the kill should land in the second generation"
    resumed = hpt("search", str(project / "search.yaml"), "--root", str(root), "-j", "2", *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    gens = logged(root)
    assert [g["generation"] for g in gens] == [0, 1, 2]
    numbers = [t["number"] for g in gens for t in g["trials"]]
    assert numbers == list(range(12))  # the same study went on: the asked trials were told, none asked twice
    runs = SweepFolder(folder).run_folders()
    assert len(runs) == len({r for g in gens for t in g["trials"] for r in t["run_ids"]})
    assert all(attempt_count(folder / r) == 1 for r in runs)  # no run was started twice
    starts = [r["run_id"] for r in json_lines(folder / "jobs.jsonl") if r["event"] == "started"]
    assert len(starts) == len(set(starts)) == len(runs)


@pytest.mark.parametrize("mode", ["diverge", "raise"])
def test_a_diverged_or_failed_point_scores_the_worst(project, tmp_path, mode):
    root = tmp_path / "runs"
    # the base point (b = 1) is past fail_above: the first generation always holds a bad point
    proc = run_search(project, root, "fail_above=0.5", f"mode={mode}", "search.budget.generations=1",
                      "search.budget.population=3", "+search.penalty=1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = [t for g in logged(root) for t in g["trials"]]
    bad = [t for t in trials if t["params"]["b"] > 0.5]
    assert bad and all(t["value"] == 1000 and t["outcome"] == ("diverged" if mode == "diverge" else "failed")
                       for t in bad)
    assert all(t["outcome"] == "completed" and t["value"] < 1000 for t in trials if t["params"]["b"] <= 0.5)
    assert "diverged or failed" in proc.stdout


def test_the_transfer_check_compares_the_best_point_with_a_tuned_lr(project, tmp_path):
    root = tmp_path / "runs"
    proc = run_search(project, root, "a=0.0625", "b=16", "search.budget.generations=1", "search.budget.population=3",
                      "+search.transfer.scale.width=64", "+search.transfer.seeds=[0,1]",
                      "+search.transfer.lr_points=3", "+search.transfer.lr_span=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = json.loads((root / "bowl" / "transfer.json").read_text())
    assert [round(lr, 6) for lr, _, _ in t["lr_grid"]] == [0.0625, 0.125, 0.25]
    assert t["baseline_lr"] == pytest.approx(0.125)  # the bowl's bottom in lr
    for scale in ("search", "large"):
        c = t["scales"][scale]
        assert len(c["diff"]) == 2 and c["mean_diff"] > 0 and "holds" in c["verdict"], c
    assert t["scales"]["large"]["search_mean"] < t["scales"]["search"]["search_mean"]  # wider: lower
    for name in ("bowl-baseline", "bowl-transfer"):  # ordinary sweeps, deduped like any other
        assert (root / name / "manifest.parquet").exists()
    assert "## Transfer check" in (root / "bowl" / "report.md").read_text()
    again = run_search(project, root, "a=0.0625", "b=16", "search.budget.generations=1", "search.budget.population=3",
                       "+search.transfer.scale.width=64", "+search.transfer.seeds=[0,1]",
                       "+search.transfer.lr_points=3", "+search.transfer.lr_span=2")
    assert again.returncode == 0 and " completed " not in again.stdout, again.stdout


@pytest.mark.parametrize(("override", "needle"), [
    ("+search.space.nosuch={low:1,high:2}", "'nosuch' is not in your config"),
    ("search.space.a.low=32", "low must be below high"),
    ("search.space.a.low=0", "a log range needs low > 0"),
    ("search.budget.population=1", "population must be a whole number >= 2"),
    ("search.strategy.name=grid", "is not one of cmaes, random"),
    ("+search.budgett=1", "search.budgett is not a key of the search block"),
])
def test_bad_input_is_one_line_before_anything_launches(project, tmp_path, override, needle):
    root = tmp_path / "runs"
    res = cli("search", str(project / "search.yaml"), override, "--root", str(root))
    assert_one_line_error(res, needle)
    assert not root.exists()


def test_bad_keys_of_the_built_in_trainer_are_one_line(tmp_path):
    f = tmp_path / "s.yaml"
    text = (REPO / "conf" / "search.yaml").read_text()
    f.write_text(text.replace("param.out_mult.R:", "param.out_mult.Q:"))
    assert_one_line_error(cli("search", str(f), "--root", str(tmp_path / "runs")), "param.out_mult.Q")
    f.write_text(text.replace("optim.beta2: {low: 0.9, high: 0.999}", "optim.beta2: {low: 0.9, high: 1.5}"))
    assert_one_line_error(cli("search", str(f), "--root", str(tmp_path / "runs")), "optim.beta2")
    f.write_text(text.replace("param.out_mult.R:", "model.n_layers:"))
    assert_one_line_error(cli("search", str(f), "--root", str(tmp_path / "runs")), "model.n_layers")
    assert not (tmp_path / "runs").exists()


def test_a_changed_space_under_the_same_name_is_refused(project, tmp_path):
    root = tmp_path / "runs"
    spec = search.load(project / "search.yaml", ["search.budget.generations=1", "search.budget.population=2"])
    search.check_definition(spec, SweepFolder(root / spec.name))  # what a first `hpt search` records
    res = cli("search", str(project / "search.yaml"), "search.budget.generations=1", "search.budget.population=2",
              "search.space.a.high=8", "--root", str(root))
    assert_one_line_error(res, "exists with a different definition (space changed)")


def test_the_packaged_demo_composes_and_conf_links_it():
    assert (REPO / "conf" / "search.yaml").read_text() == (
        REPO / "hptransfer" / "config" / "sweeps" / "search.yaml").read_text()
    res = cli("search", "search", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "param.lr_mult.H" in res.stdout and "48 runs" in res.stdout and "model.width=128" in res.stdout


# ---- SLURM -----------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_a_search_on_slurm_runs_each_generation_as_an_array(project, tmp_path):
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no SLURM cluster answers")
        pytest.skip("no SLURM cluster here (sinfo)")
    root = tmp_path / "runs"
    proc = hpt("search", str(project / "search.yaml"), "--root", str(root), "search.budget.generations=2",
               "search.budget.population=3", "launcher=slurm", "launcher.gpus_per_node=0",
               "launcher.cpus_per_task=1", "launcher.mem_gb=0.5", "launcher.timeout_min=5", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gens = logged(root)
    assert len(gens) == 2 and all(t["outcome"] == "completed" for g in gens for t in g["trials"])
    assert proc.stdout.count("runs submitted to SLURM as job") == 2  # one array per generation
    records = json_lines(root / "bowl" / "jobs.jsonl")
    assert "slurm" in {r.get("executor") for r in records} and "local" not in {r.get("executor") for r in records}


def test_sensitivities_rank_the_key_the_objective_depends_on_first():
    """A detector: the objective depends on `a` alone, so `a` takes nearly all the share and `b` almost none;
    swapped, the ranking swaps."""
    import random

    from hptransfer.sweeps.search import sensitivities

    rng = random.Random(0)
    space = {"a": {"low": 0.125, "high": 8.0, "log": True}, "b": {"low": 0.0, "high": 1.0, "log": False}}
    points = [{"a": 2 ** rng.uniform(-3, 3), "b": rng.uniform(0, 1)} for _ in range(60)]
    for key, other in (("a", "b"), ("b", "a")):
        def loss(p: dict, key: str = key) -> float:
            return (math.log2(p[key]) - 1) ** 2 if key == "a" else (p[key] - 0.3) ** 2
        logged = [{"trials": [{"params": p, "value": loss(p), "outcome": "completed"} for p in points]}]
        shares = sensitivities(logged, space)
        assert list(shares)[0] == key and shares[key] > 0.8 > shares[other], shares
    assert sensitivities([{"trials": []}], space) == {}  # too few trials: no ranking
