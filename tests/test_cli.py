"""The command line as a user meets it: hints to paste, output that is never hard-wrapped, --help examples,
`hpt status --watch` on a small screen, the figures and tables of the analysis, --version, completion,
--print-config, --json, a cached `hpt train`, sweeps from several commits, one learning-rate format, and the
sweep files shipped in the package (`hpt sweep width` from anywhere, `hpt init`)."""

import inspect
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from hptransfer import cli as hpt_cli
from hptransfer import views
from hptransfer.analysis import plots
from hptransfer.analysis.analyze import analyze
from hptransfer.analysis.load import load_results
from hptransfer.analysis.report import tables
from hptransfer.analysis.summary import fmt_loss, summary
from hptransfer.formats import fmt_lr
from hptransfer.sweeps.state import run_states
from hptransfer.sweeps.store import RunState, SweepFolder, latest_loss, planned_steps
from tests.conftest import HPT, REPO, TINY, cli
from tests.test_analysis import Truth, table, write
from tests.test_sweep import TINY_SWEEP

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TWO_RUNS = ["optim.lr=0.01", "param=sp", "train.seed=0"]  # the tiny sweep narrowed to its 2 widths


# ---- a tiny sweep, launched detached once for the module ---------------------------------------------


@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("sweep")
    tiny = base / "tiny.yaml"
    tiny.write_text(TINY_SWEEP)
    root = base / "my runs"  # a space: the hints must quote it
    res = cli("sweep", str(tiny), *TWO_RUNS, "--root", str(root), "--detach", "--jobs", "2")
    assert res.returncode == 0, res.stderr
    folder = SweepFolder(root / "tiny")
    deadline = time.time() + 240
    while any(s.active or s.state == "pending" for s in run_states(folder)):
        assert time.time() < deadline, "the detached sweep did not finish"
        time.sleep(0.5)
    return {"tiny": tiny, "root": root, "folder": folder, "detach": res}


# ---- item 10: hints, wrapping, help, status --watch ---------------------------------------------------


def test_every_hint_carries_the_root_it_was_given(done_sweep):
    out = done_sweep["detach"].stdout
    line = next(ln for ln in out.splitlines() if "follow with:" in ln)
    pasted = line.split("follow with: ", 1)[1].strip()
    root = done_sweep["root"]
    assert pasted == f"hpt status tiny --watch --root '{root}'", pasted
    # The hint works as pasted (without --watch: the sweep is done).
    res = cli(*__import__("shlex").split(pasted)[1:])
    assert res.returncode == 0 and "tiny" in res.stdout, res.stderr
    assert hpt_cli.hint("status", "w", root=Path("/a b")) == "hpt status w --root '/a b'"
    # status's own hints (the cut table's caption, the failures) carry it too.
    states = [RunState(f"r{i:03d}", {"model.width": 16}, "failed", reason="boom") for i in range(120)]
    view = views.status_view({"tiny": states}, [done_sweep["folder"]], detail=True, hint=hpt_cli.hint(
        "status", "tiny", root=root))
    text = render(view, 200)
    assert f"hpt status tiny --root '{root}' --json" in text


def test_piped_output_is_never_hard_wrapped():
    buf = io.StringIO()
    out = hpt_cli.Out(file=buf)
    assert not out.is_terminal and out.width >= hpt_cli.PIPE_WIDTH
    line = "hpt train " + " ".join(f"model.key{i}=value{i}" for i in range(30))  # ~500 columns
    out.print(line)
    assert buf.getvalue() == line + "\n"
    term = hpt_cli.Out(file=io.StringIO(), force_terminal=True, width=80)
    assert term.width == 80  # a terminal is drawn as rich draws it


def test_help_examples_stay_one_line_at_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "50")  # piped help is laid out at 80 whatever the terminal says
    for command in hpt_cli.app.registered_commands:
        name = command.name or command.callback.__name__
        doc = inspect.cleandoc(command.callback.__doc__)
        assert all(len(ln) <= 76 for ln in doc.splitlines()[1:]), name  # each line fits the help panel
        examples = doc.split("Examples:", 1)[1].splitlines() if "Examples:" in doc else []
        assert examples, f"{name} has no examples"
        res = cli(name.replace("_", "-"), "--help")
        assert res.returncode == 0, res.stderr
        shown = [ln.strip() for ln in res.stdout.splitlines()]
        for example in filter(None, (e.strip() for e in examples)):
            assert example in shown, (name, example)


def attention_sweep() -> list[RunState]:
    """A sweep a 24-row screen cannot hold: 30 failed runs with logs, 6 running, 40 queued, 100 done."""
    states = []
    for i in range(176):
        point = {"model.width": 16 * 2 ** (i % 3), "optim.lr": 2.0 ** -(6 + i % 5), "param": "sp", "train.seed": 0}
        if i < 30:
            s = RunState(f"fail{i:04d}", point, "failed", reason=f"exited with code 1 (run {i})",
                         log_tail="Traceback (most recent call last):\n  File x\nValueError: bad")
        elif i < 36:
            s = RunState(f"runn{i:04d}", point, "running", reason="running", active=True, step=50)
        elif i < 76:
            s = RunState(f"queu{i:04d}", point, "pending", reason="queued", active=True)
        else:
            s = RunState(f"done{i:04d}", point, "completed", result={"final_val_loss": 2.0 + i / 1000}, step=100)
        states.append(s)
    return states


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def extras_for(states: list[RunState], now: float) -> views.Extras:
    """Job records as the local scheduler writes them: the finished runs took 10 s, the running ones started
    5 s ago and are halfway (step 50 of 100)."""
    records = []
    for s in states:
        if s.state == "completed":
            records += [{"event": "started", "run_id": s.run_id, "started_at": stamp(now - 100)},
                        {"event": "ended", "run_id": s.run_id, "ended_at": stamp(now - 90)}]
        elif s.state == "running":
            records.append({"event": "started", "run_id": s.run_id, "started_at": stamp(now - 5)})
    ex = views.Extras(records=records, now=now)
    for s in states:
        if s.state == "running":
            ex.losses[s.run_id], ex.total_steps[s.run_id] = 2.5, 100
    return ex


def render(renderable, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_status_watch_fits_a_24_row_screen_attention_first(tmp_path):
    states = attention_sweep()
    ex = extras_for(states, time.time())
    folder = SweepFolder(tmp_path / "big")
    view = views.status_view({"big": states}, [folder], detail=True, extras={"big": ex}, hint="hpt status big",
                             height=24, width=80)
    text = render(view, 80)
    lines = text.splitlines()
    assert len(lines) <= 23, text  # a live display keeps its cursor on the last row
    assert all(len(ln) <= 80 for ln in lines)
    runs = [ln.split()[0] for ln in lines if ln.startswith((" fail", " runn", " queu", " done"))]
    assert runs and runs[0].startswith("fail")  # the runs that need attention first
    assert not any(r.startswith("done") for r in runs)
    assert re.search(r"and \d+ more runs \(\d+ that need attention, 100 finished\)", text), text
    assert "ETA about" in text and "failed fail0000" in text  # the ETA, and a failed run's log
    # Unfitted (hpt status), every failed run and the grids are there: nothing was lost, only cut for the screen.
    full = render(views.status_view({"big": states}, [folder], detail=True, extras={"big": ex}), 80)
    assert full.count("fail00") >= 30 and "opt lr" in full


def test_status_watch_under_a_fake_24_row_terminal(done_sweep, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(hpt_cli, "console", hpt_cli.Out(file=buf, force_terminal=True, width=80, height=24))
    res = cli("status", "tiny", "--watch", "--root", str(done_sweep["root"]))
    assert res.returncode == 0, res.stderr
    text = ANSI.sub("", buf.getvalue())
    assert "completed" in text and len([ln for ln in text.splitlines() if ln.strip()]) <= 23


def test_eta_from_finished_wall_times_and_running_progress():
    states = attention_sweep()
    now = time.time()
    seconds, how = views.eta(states, extras_for(states, now))
    # 6 running, each 5 s in and halfway: 5 s left each; 40 queued at 10 s each, on 6 slots.
    assert seconds == pytest.approx((6 * 5 + 40 * 10) / 6, rel=0.02)
    assert "6 running, 40 queued" in how and "100 finished runs" in how


def test_running_runs_show_their_latest_loss(done_sweep, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 3.0 - i / 100}) + "\n" for i in range(2000))
                       + json.dumps({"step": 2000, "val_loss": 1.0}) + "\n" + '{"step": 2001, "lo')  # torn line
    assert latest_loss(tmp_path) == pytest.approx(3.0 - 1999 / 100)
    assert planned_steps(done_sweep["folder"].run_dir(run_states(done_sweep["folder"])[0].run_id)) == 10
    s = RunState("abc", {"model.width": 16}, "running", step=5, active=True)
    ex = views.Extras(losses={"abc": 2.3456}, total_steps={"abc": 10})
    row = render(views.runs_table([s], ["model.width"], extras=ex), 120)
    assert "5/10" in row and "2.3456 train" in row


# ---- item 11: figures and the report's columns --------------------------------------------------------


@pytest.fixture(scope="module")
def flat_analysis(tmp_path_factory):
    """muP whose optimum drifts a tenth of an octave over 3 widths, and a bowl steep enough to leave points
    above the loss plot's clipped range."""
    truths = {"mup": Truth(slope=0.05)}
    path = write(table(truths, widths=(64, 128, 256), seeds=(0, 1), noise=0.002),
                 tmp_path_factory.mktemp("flat") / "r.parquet")
    return analyze(load_results([path], "final_val_loss"), n_boot=0)


def test_optimum_axis_spans_two_octaves_with_distinct_ticks(flat_analysis):
    fig = plots._optimum_vs_scale(flat_analysis.results, "width")
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert hi - lo >= plots.MIN_SPAN_LOG2
    labels = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


def test_points_above_the_loss_range_are_marked_and_counted(flat_analysis):
    fig = plots._loss_vs_lr(flat_analysis.results, "final_val_loss")
    ax = fig.axes[0]
    top = ax.get_ylim()[1]
    r = flat_analysis.results[0]
    expected = 0
    for curve in r.curves:
        mean, valid = curve.mean()
        expected += int((valid & (mean > top - 1e-12)).sum())
    marks = [ln for ln in ax.lines if ln.get_gid() == "above"]
    assert expected > 0 and sum(len(m.get_xdata()) for m in marks) == expected
    assert all(np.allclose(m.get_ydata(), top) for m in marks)
    assert f"{expected} point(s) above the range" in ax.get_legend().get_title().get_text()


def test_report_columns_say_which_loss_is_fitted_and_which_measured(flat_analysis):
    s = summary(flat_analysis)
    _, optima, _, metrics = tables(s)
    fitted, measured = optima.columns.index("loss* (fitted)"), optima.columns.index("loss at best lr tried (measured)")
    for row, o in zip(optima.rows, s["groups"][0]["optima"], strict=True):
        assert row[fitted] == fmt_loss(o["loss_opt"]) and row[measured] == fmt_loss(o["loss_best_grid"])
    assert "L_inf (fitted)" in metrics.columns and "delta loss at largest (measured)" in metrics.columns


# ---- item 12: version, completion, --print-config, --json, cache, commits, one LR format ------------


def test_version_and_shell_completion():
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.startswith(f"hpt {hpt_cli.__version__}")
    # The shell is detected from the parent processes (Typer's shellingham): hpt runs as a child of bash (the
    # `exit` after it keeps bash from exec'ing it in its place).
    res = subprocess.run(["bash", "-c", f"{shlex.quote(HPT)} --show-completion; exit $?"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "_hpt_completion" in res.stdout and "complete " in res.stdout, res.stderr


def test_print_config_prints_the_composed_yaml_and_exits(tmp_path):
    import yaml

    res = cli("train", *TINY, "--print-config", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["model"]["width"] == 32 and cfg["train"]["steps"] == 20
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written
    res = cli("sweep", "width", "model.width=64,128", "--print-config", "--root", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    sweep = yaml.safe_load(res.stdout)["sweep"]
    assert sweep["name"] == "width" and sweep["axis"] == {"key": "model.width", "values": [64, 128]}
    assert not (tmp_path / "runs").exists()


def test_train_json_and_a_cached_run_says_so(tmp_path):
    run = tmp_path / "run"
    first = cli("train", *TINY, "--run-dir", str(run), "--json")
    assert first.returncode == 0, first.stderr
    record = json.loads(first.stdout)
    assert record["status"] == "completed" and record == json.loads((run / "result.json").read_text())
    again = cli("train", *TINY, "--run-dir", str(run), "--json")
    assert json.loads(again.stdout) == record and "cached" in again.stderr
    plain = cli("train", *TINY, "--run-dir", str(run))
    assert "(cached)" in plain.stdout and "val loss" in plain.stdout


def test_collect_json_says_what_was_written(done_sweep, tmp_path):
    out = tmp_path / "r.parquet"
    res = cli("collect", "tiny", "--root", str(done_sweep["root"]), "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["path"] == str(out) and data["rows"] == 2 and data["counts"] == {"completed": 2}
    assert data["warnings"] == [] and out.is_file()


def test_dry_run_json_is_the_plan_with_a_measured_estimate(tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_SWEEP)
    res = cli("sweep", str(tiny), "--dry-run", "--json", "--root", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["runs"] == plan["to_launch"] == 40 and len(plan["run_ids_to_launch"]) == 40
    assert [d["key"] for d in plan["dims"]] == ["model.width", "optim.lr", "param", "train.seed"]
    assert [row["value"] for row in plan["per_axis"]] == [16, 32] and plan["flops"] > 0
    est = plan["estimate"]
    assert est["kind"] == "measured" and est["wall_s"] > 0 and "measured here" in est["how"]
    assert "GPU" not in json.dumps(est)  # a CPU is the target: no GPU-hours
    gpu = cli("sweep", str(tiny), "--dry-run", "--json", "launcher=slurm", "--root", str(tmp_path / "runs"))
    assert json.loads(gpu.stdout)["estimate"]["kind"] == "gpu_hours"
    text = cli("sweep", str(tiny), "--dry-run", "--root", str(tmp_path / "runs")).stdout
    assert "estimate: 40 runs to launch: about" in text and "GPU-hours" not in text
    assert not (tmp_path / "runs").exists()


def test_a_sweep_from_several_commits_is_warned_about(done_sweep, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(done_sweep["folder"].path, root / "tiny")
    folder = SweepFolder(root / "tiny")
    rid = run_states(folder)[0].run_id
    folder.append_jobs([{"event": "queued", "run_id": rid, "executor": "local", "git_commit": "0123456789abcdef",
                         "git_dirty": False, "scheduler": {"pid": 1, "start": 0, "host": "elsewhere"}},
                        {"event": "ended", "run_id": rid, "executor": "local", "returncode": 0}])
    status = cli("status", "tiny", "--root", str(root))
    assert "its runs come from 2 commits" in status.stdout and "0123456789 (1 runs)" in status.stdout
    assert cli("status", "--root", str(root), "--json").returncode == 0
    res = cli("sweep", str(done_sweep["tiny"]), *TWO_RUNS, "--root", str(root), "--dry-run")
    assert res.returncode == 0 and "its runs come from" in res.stderr and "0123456789" in res.stderr


def test_learning_rates_read_the_same_in_status_and_analyze():
    """One function (formats.fmt_lr) formats them: the status grid's headers use it, and so does the
    analysis report (tests/test_analysis.py checks its table cells against it)."""
    assert fmt_lr(2.0**-7) == "0.00781 (2^-7)" and fmt_lr(2.0**-6.5) == "0.011 (2^-6.5)"
    assert fmt_lr(0.00975) == "0.00975" and fmt_lr(None) == "-"
    for lr in (2.0**-7, 2.0**-6.5, 0.00975, 3e-4):
        assert views.fmt_dim("optim.lr", lr) == fmt_lr(lr)
    assert views.fmt_dim("model.width", 128) == "128"


# ---- item 13: the sweep files ship in the package ---------------------------------------------------


def test_conf_holds_the_packaged_sweep_files():
    packaged = sorted(p.name for p in hpt_cli.SWEEPS_DIR.glob("*.yaml"))
    assert {"batch.yaml", "depth.yaml", "duration.yaml", "width.yaml", "tpp.yaml"} <= set(packaged)
    assert sorted(p.name for p in (REPO / "conf").glob("*.yaml")) == packaged  # conf/ links to each, and only those
    for name in packaged:
        assert (REPO / "conf" / name).read_text() == (hpt_cli.SWEEPS_DIR / name).read_text()


def test_a_sweep_by_name_and_a_missing_one():
    assert hpt_cli.find_sweep_file(Path("width")) == hpt_cli.SWEEPS_DIR / "width.yaml"
    assert hpt_cli.find_sweep_file(Path("depth.yaml")) == hpt_cli.SWEEPS_DIR / "depth.yaml"
    res = cli("sweep", "nosuch", "--dry-run")
    assert res.returncode == 2 and "packaged sweep" in res.stderr and "width" in res.stderr


def test_init_copies_the_sweep_files_and_never_overwrites_without_force(tmp_path):
    dest = tmp_path / "studies"
    res = cli("init", str(dest))
    assert res.returncode == 0, res.stderr
    packaged = sorted(p.name for p in hpt_cli.SWEEPS_DIR.glob("*.yaml"))
    assert sorted(p.name for p in dest.iterdir()) == packaged
    assert f"hpt sweep {dest / 'width.yaml'} --dry-run" in res.stdout
    (dest / "width.yaml").write_text("# mine\n")
    res = cli("init", str(dest))
    assert res.returncode == 0 and f"kept {len(packaged)} existing" in res.stderr
    assert (dest / "width.yaml").read_text() == "# mine\n"
    res = cli("init", str(dest), "--force")
    assert (dest / "width.yaml").read_text() == (hpt_cli.SWEEPS_DIR / "width.yaml").read_text()


def test_a_built_wheel_holds_the_sweep_files_and_runs_them_from_an_empty_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hptransfer", src / "hptransfer", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
                    str(wheels)], cwd=src, check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("hptransfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sweep in ("width", "depth", "batch", "duration"):
        assert f"hptransfer/config/sweeps/{sweep}.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-c", "from hptransfer.cli import main; main()", "sweep", "width",
                          "--dry-run", "--json", "--root", str(empty / "runs")], cwd=empty, capture_output=True,
                         text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site),
                                                      "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["runs"] == 84 and plan["file"].startswith(str(site))
    assert list(empty.iterdir()) == []


def test_the_installed_command_finds_a_packaged_sweep_anywhere(tmp_path):
    res = subprocess.run([HPT, "sweep", "depth", "--print-config"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "name: depth" in res.stdout, res.stderr
