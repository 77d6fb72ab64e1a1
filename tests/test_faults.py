"""Faults of the sweep folder, injected for real: a torn jobs.jsonl, a deleted or truncated manifest,
corrupt metrics, result and sweep files, a full disk (a real 2 MB tmpfs), and the umask.

The tmpfs tests mount with `mount -t tmpfs` (root, as in CI); where that is impossible they are
skipped, except under CI=true, where they fail (as the SLURM tests do).
"""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hptransfer.files import append_lines, json_lines, signals_deferred
from hptransfer.sweeps import launch, plan
from hptransfer.sweeps.backends.local import queued_records
from hptransfer.sweeps.state import run_states
from hptransfer.sweeps.store import SweepFolder, read_metrics
from tests.conftest import HPT, assert_one_line_error, cli, hpt
from tests.test_sweep import TINY_SWEEP

# Four finished runs: two widths (so `hpt analyze` has a scaling axis) x two learning rates.
GRID = ["model.width=16,32", "optim.lr=0.004,0.008", "param=sp", "sweep.seeds=[0]"]


def sweep_args(tiny: Path, root: Path, *args: str) -> list[str]:
    return ["sweep", str(tiny), "--root", str(root), "-j", "2", *args]


def records(folder: Path, event: str | None = None) -> list[dict]:
    return [r for r in json_lines(folder / "jobs.jsonl") if event is None or r.get("event") == event]


def status(root: Path) -> dict[str, dict]:
    res = cli("status", "tiny", "--json", "--root", str(root))
    assert res.returncode == 0, res.stderr
    return {r["run_id"]: r for r in json.loads(res.stdout)["tiny"]["runs"]}


def warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("hpt: warning:")]


def temp_files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".reserve")]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY_SWEEP)
    return f


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root holding the sweep 'tiny' with four completed runs (copy it before breaking it)."""
    base = tmp_path_factory.mktemp("finished")
    (base / "tiny.yaml").write_text(TINY_SWEEP)
    proc = hpt(*sweep_args(base / "tiny.yaml", base / "runs", *GRID))
    assert proc.returncode == 0, proc.stderr
    return base / "runs"


@pytest.fixture
def root(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "runs")
    return tmp_path / "runs"


# ---- 1. a torn last line never swallows the next record ----------------------------------------------


def truncate(path: Path, size: str) -> None:
    subprocess.run(["truncate", "-s", size, str(path)], check=True)


def test_a_torn_last_line_never_swallows_the_next_claim(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    spec = plan.load(tiny, ["optim.lr=0.01", "sweep.seeds=[0]"])
    launch.prepare(folder, spec, plan.expand(spec))
    a, b, *_ = [r["run_id"] for r in folder.manifest()]
    folder.append_jobs([{"event": "cancelled", "run_id": a, "executor": "local", "reason": "cancelled by hpt cancel",
                         "at": "2025-01-01T00:00:00+00:00"}])
    truncate(folder.jobs_file, "-40")  # a writer killed mid-line
    with launch.claiming(folder, [b], retry_failed=False) as todo:
        folder.append_jobs(queued_records(todo, {"git_commit": None, "git_dirty": False}))
    assert [s.run_id for s in todo] == [b]
    assert folder.jobs_file.read_bytes().count(b"\n") == 2  # the torn line ended, the claim on a line of its own
    assert [(r["event"], r["run_id"]) for r in folder.job_records()] == [("queued", b)]
    held = {s.run_id: s for s in run_states(folder)}[b]
    assert (held.state, held.reason, held.active) == ("pending", "queued", True)  # held by this live process
    with launch.claiming(folder, [b], retry_failed=False) as again:
        assert again == []  # claimed once: a second launcher sees the claim
    # The same rule for the results index and the loss curve.
    index = folder.path / "results.jsonl"
    index.write_text('{"run_id": "' + a + '", "key": [1, 2, 3], "attempts": 1, "result": {"status": "comp')
    folder.index_results([{"run_id": b, "key": [4, 5, 6], "attempts": 1,
                           "result": {"run_id": b, "status": "completed"}}])
    assert list(folder.result_index()) == [b]
    metrics = folder.run_dir(b) / "metrics.jsonl"
    metrics.write_text('{"step": 0, "loss": 5.5}\n{"step": 1, "loss": 5.25}\n')
    truncate(metrics, "-10")
    append_lines(metrics, '{"step": 1, "loss": 5.0}\n')
    assert read_metrics(folder.run_dir(b)) == ([{"step": 0, "loss": 5.5}, {"step": 1, "loss": 5.0}], None)


def test_a_sweep_after_a_torn_jobs_line_claims_and_runs_each_new_point_once(tiny, root):
    old = set(status(root))
    truncate(root / "tiny" / "jobs.jsonl", "-40")
    wider = GRID[:1] + ["optim.lr=0.004,0.008,0.016"] + GRID[2:]
    res = cli(*sweep_args(tiny, root, *wider))
    assert res.returncode == 0, res.stdout + res.stderr
    queued = Counter(r["run_id"] for r in records(root / "tiny", "queued"))
    started = Counter(r["run_id"] for r in records(root / "tiny", "started"))
    new = set(started) - old
    assert len(new) == 2 and set(started.values()) == {1}  # the four old runs and two new ones, each once
    assert all(queued[rid] == 1 for rid in new)  # every new claim readable
    assert {r["state"] for r in status(root).values()} == {"completed"}
    assert "nothing to launch" in cli(*sweep_args(tiny, root, *wider)).stdout


# ---- 2. the manifest is derived: rebuilt when missing or unreadable -------------------------------


def test_a_deleted_manifest_is_rebuilt_from_the_run_folders(tiny, root):
    manifest = root / "tiny" / "manifest.parquet"
    before = pq.read_table(manifest).to_pylist()
    manifest.unlink()
    res = cli("status", "tiny", "--json", "--root", str(root))
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)["tiny"]["runs"]
    assert len(runs) == 4 and {r["state"] for r in runs} == {"completed"}
    (line,) = warnings(res.stderr)
    assert "manifest.parquet was missing: rebuilt it from 4 run folders" in line
    assert pq.read_table(manifest).to_pylist() == before  # the same rows, in the plan's order, written back
    manifest.unlink()
    out = root.parent / "results.parquet"
    res = cli("collect", "tiny", "--root", str(root), "--out", str(out))
    assert res.returncode == 0 and len(warnings(res.stderr)) == 1, res.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"} and {r["width"] for r in rows} == {16, 32}
    assert all(len(r["curve_loss"]) == 10 for r in rows)


def test_a_truncated_manifest_is_rebuilt_by_status_collect_and_sweep(tiny, root):
    manifest = root / "tiny" / "manifest.parquet"
    before = pq.read_table(manifest).to_pylist()
    good = manifest.read_bytes()
    cut = str(min(3800, len(good) // 2))
    truncate(manifest, cut)
    assert len(status(root)) == 4
    assert pq.read_table(manifest).to_pylist() == before
    truncate(manifest, cut)
    out = root.parent / "results.parquet"
    res = cli("collect", "tiny", "--root", str(root), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "manifest.parquet was unreadable" in warnings(res.stderr)[0]
    assert pq.read_table(out).num_rows == 4
    truncate(manifest, cut)
    res = cli(*sweep_args(tiny, root, *GRID))
    assert res.returncode == 0 and "nothing to launch" in res.stdout, res.stdout + res.stderr
    assert len(warnings(res.stderr)) == 1 and pq.read_table(manifest).to_pylist() == before
    assert len(records(root / "tiny", "started")) == 4


# ---- 3. a corrupt file is a reported bad run, never a traceback ------------------------------------


@pytest.mark.parametrize(("bad_line", "why"), [
    (b"\xff\xfe garbage\n", "metrics.jsonl line 2 is not UTF-8 text"),
    (b'"a bare string"\n', "metrics.jsonl line 2 is not an object"),
    (b'{"step": "x", "loss": "abc"}\n', "metrics.jsonl line 2: step is not an integer"),
    (b'{"step": 1, "loss": "abc"}\n', "metrics.jsonl line 2: loss is not a number"),
])
def test_a_corrupt_metrics_file_skips_that_curve_with_a_warning(root, bad_line, why):
    bad = sorted(status(root))[0]
    metrics = root / "tiny" / bad / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(lines[0] + bad_line + b"".join(lines[1:]))
    out = root.parent / "results.parquet"
    res = cli("collect", "tiny", "--root", str(root), "--out", str(out))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert warnings(res.stderr) == [f"hpt: warning: tiny/{bad}: {why}: curve skipped"]
    rows = {r["run_id"]: r for r in pq.read_table(out).to_pylist()}
    assert rows[bad]["status"] == "completed" and rows[bad]["curve_loss"] == [] and rows[bad]["final_val_loss"] > 0
    assert all(len(r["curve_loss"]) == 10 for k, r in rows.items() if k != bad)


def test_a_result_with_a_wrong_type_is_a_failed_run_reported_by_status_and_collect(root):
    bad = sorted(status(root))[0]
    result = root / "tiny" / bad / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "final_val_loss": "abc"}))
    run = status(root)[bad]
    assert (run["state"], run["reason"]) == ("failed", "corrupt result.json: final_val_loss is not a number")
    view = cli("status", "tiny", "--root", str(root))
    assert view.returncode == 0 and "final_val_loss is not a number" in view.stdout, view.stderr
    out = root.parent / "results.parquet"
    res = cli("collect", "tiny", "--root", str(root), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert warnings(res.stderr) == [f"hpt: warning: tiny/{bad}: corrupt result.json: final_val_loss is not a number: "
                                    "skipped"]
    rows = {r["run_id"]: r for r in pq.read_table(out).to_pylist()}
    assert rows[bad]["status"] == "failed" and rows[bad]["final_val_loss"] is None
    assert sum(r["status"] == "completed" for r in rows.values()) == 3


def test_a_corrupt_sweep_yaml_is_one_line_naming_the_file_and_the_fix(tiny, root):
    sweep_yaml = root / "tiny" / "sweep.yaml"
    sweep_yaml.write_text("sweep: {axis: [unclosed\n")
    res = cli(*sweep_args(tiny, root, *GRID))
    assert_one_line_error(res, f"{sweep_yaml} is corrupt")
    assert "delete it and run the same hpt sweep again" in res.stderr
    assert len(status(root)) == 4  # status never needed it
    sweep_yaml.unlink()  # the fix the message names
    res = cli(*sweep_args(tiny, root, *GRID))
    assert res.returncode == 0 and "nothing to launch" in res.stdout, res.stdout + res.stderr
    assert "axis" in sweep_yaml.read_text()


# ---- 4. a full disk: one line, consistent states, and the same command resumes ----------------------


@contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A real tmpfs of `size` at `path`, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but a tmpfs cannot be mounted here (run the tests as root): {proc.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a ballast file until the file system is full; returns it (delete it to free the space)."""
    ballast = disk / "ballast"
    with open(ballast, "ab", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(chunk))
            except OSError as err:
                assert err.errno == errno.ENOSPC
    return ballast


def assert_disk_full_line(res: subprocess.CompletedProcess | object, code: int) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hpt: error: disk full"), res.stderr
    assert "run the same command again" in lines[0] and "Traceback" not in res.stdout + res.stderr
    return lines[0]


def test_a_sweep_into_a_full_disk_says_so_and_the_same_command_resumes(tiny, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        root = disk / "runs"
        ballast = fill(disk)
        args = sweep_args(tiny, root, "model.width=16", "optim.lr=0.004,0.008", "param=sp", "sweep.seeds=[0]")
        line = assert_disk_full_line(hpt(*args), 2)
        assert str(root / "tiny") in line and "needed" in line
        assert temp_files(disk) == []
        ballast.unlink()
        res = hpt(*args)
        assert res.returncode == 0, res.stderr
        assert {r["state"] for r in status(root).values()} == {"completed"}
        started = Counter(r["run_id"] for r in records(root / "tiny", "started"))
        assert len(started) == 2 and set(started.values()) == {1}
        assert temp_files(disk) == []


def test_a_disk_filling_mid_sweep_stops_cleanly_and_the_same_command_finishes_every_run_once(tiny, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        root = disk / "runs"
        args = [HPT, *sweep_args(tiny, root, *GRID)[:-2], "-j", "1", *GRID]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not list(root.glob("tiny/*/result.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        fill(disk)  # after the first run finished: the disk fills under the sweep
        out, err = proc.communicate(timeout=300)
        res = subprocess.CompletedProcess(args, proc.returncode, out, err)
        line = assert_disk_full_line(res, 1)  # 1: some runs had ended
        assert "stopped and recorded cancelled" in line and "resumes them" in line
        assert temp_files(disk) == []
        runs = status(root)  # readable on the full disk
        done = {rid for rid, r in runs.items() if r["state"] == "completed"}
        assert done and all((r["state"], r["reason"]) == ("cancelled", "disk full")
                            for rid, r in runs.items() if rid not in done)
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0  # a bigger disk
        res = hpt(*sweep_args(tiny, root, "-j", "1", *GRID))
        assert res.returncode == 0, res.stderr
        assert {r["state"] for r in status(root).values()} == {"completed"}
        ended_ok = Counter(r["run_id"] for r in records(root / "tiny", "ended") if r["returncode"] == 0)
        assert len(ended_ok) == 4 and set(ended_ok.values()) == {1}  # every run finished exactly once
        started = Counter(r["run_id"] for r in records(root / "tiny", "started"))
        assert all(started[rid] == 1 for rid in done)  # a finished run is never started again
        assert temp_files(disk) == []


def test_a_checkpoint_the_disk_cannot_hold_leaves_no_temp_file_and_the_run_resumes(tiny, tmp_path):
    """Width 128 checkpoints ~3 MB (weights and Adam's moments) into a 2 MB disk: torch.save fails midway."""
    with tmpfs(tmp_path / "disk") as disk:
        root = disk / "runs"
        args = sweep_args(tiny, root, "model.width=16,128", "optim.lr=0.004", "param=sp", "sweep.seeds=[0]",
                          "train.checkpoint_every=5", "-j", "1")
        line = assert_disk_full_line(hpt(*args), 2)  # the largest run goes first: none had ended
        assert "0 runs ended, 2 stopped and recorded cancelled" in line
        assert temp_files(disk) == [] and not list(root.glob("tiny/*/checkpoint.*"))
        runs = status(root)
        assert [(r["state"], r["reason"]) for r in runs.values()] == [("cancelled", "disk full")] * 2
        (log,) = root.glob("tiny/*/logs/attempt-1.log")  # the one run that started says why it stopped
        assert "[hpt] attempt 1 stopped: disk full; the same command resumes it" in log.read_text()
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
        res = hpt(*args)
        assert res.returncode == 0, res.stderr
        assert {r["state"] for r in status(root).values()} == {"completed"}
        assert temp_files(disk) == []


def test_a_fused_group_the_disk_cannot_checkpoint_is_cancelled_whole_and_the_same_command_resumes_it(tiny, tmp_path):
    with tmpfs(tmp_path / "disk") as disk:
        root = disk / "runs"
        args = sweep_args(tiny, root, "model.width=128", "optim.lr=0.004,0.008", "param=sp", "sweep.seeds=[0]",
                          "train.checkpoint_every=5", "launcher.fuse=2", "-j", "1")
        line = assert_disk_full_line(hpt(*args), 2)
        assert "0 runs ended, 2 stopped and recorded cancelled" in line
        assert temp_files(disk) == [] and not list(root.glob("tiny/*/checkpoint.*"))
        assert [(r["state"], r["reason"]) for r in status(root).values()] == [("cancelled", "disk full")] * 2
        logs = [p.read_text() for p in root.glob("tiny/*/logs/attempt-1.log")]
        assert len(logs) == 2 and all("stopped: disk full; the same command resumes it" in t for t in logs)
        assert len({r["pid"] for r in records(root / "tiny", "started")}) == 1  # one job trained both
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0
        res = hpt(*args)
        assert res.returncode == 0, res.stderr
        assert {r["state"] for r in status(root).values()} == {"completed"}
        assert temp_files(disk) == []


# ---- 9. files others can read: 0666 and 0777 less the umask ----------------------------------------


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_every_file_of_a_sweep_and_its_report_gets_the_umask_mode(tiny, tmp_path, umask):
    root, out = tmp_path / "runs", tmp_path / "results.parquet"
    old = os.umask(umask)  # inherited by the commands and every job they start
    try:
        assert hpt(*sweep_args(tiny, root, "model.width=16,32", "optim.lr=0.004", "param=sp",
                               "sweep.seeds=[0]")).returncode == 0
        assert hpt("collect", "--root", str(root), "--out", str(out)).returncode == 0
        res = hpt("analyze", str(out), "--out", str(tmp_path / "report"))
        assert res.returncode == 0, res.stderr
    finally:
        os.umask(old)
    paths = [root, *root.rglob("*"), out, tmp_path / "report", *(tmp_path / "report").rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in paths}
    expected = {str(p.relative_to(tmp_path)): oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in paths}
    assert modes == expected
    names = {p.name for p in paths}
    assert {"result.json", "metrics.jsonl", "heartbeat.json", "config.yaml", "results.parquet", "report.md",
            "summary.json", "jobs.jsonl", "manifest.parquet"} <= names and any(n.endswith(".png") for n in names)


# ---- the scheduler itself survives what it cannot write ----------------------------------------------


def test_ctrl_c_on_a_full_disk_still_records_every_run(tiny, tmp_path):
    """The scheduler's reserve: stopped while the disk is full (and jobs.jsonl's last page too), it still
    records the running and the queued run cancelled, never leaving them pending or failed."""
    with tmpfs(tmp_path / "disk") as disk:
        root = disk / "runs"
        args = [HPT, *sweep_args(tiny, root, "model.width=16", "optim.lr=0.004,0.008", "param=sp", "sweep.seeds=[0]",
                                 "train.steps=2000", "train.log_every=2000"), "-j", "1"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not (root / "tiny" / "jobs.jsonl").exists() or not records(root / "tiny", "started"):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        jobs = root / "tiny" / "jobs.jsonl"
        pad = 4096 - (jobs.stat().st_size + len('{"event": "pad", "run_id": "pad", "x": ""}\n')) % 4096
        append_lines(jobs, json.dumps({"event": "pad", "run_id": "pad", "x": "x" * pad}) + "\n")
        assert jobs.stat().st_size % 4096 == 0  # the next record needs a page of its own
        fill(disk)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Resume with the same command" in err, err
        runs = status(root)
        assert [r["state"] for r in runs.values()] == ["cancelled", "cancelled"], runs
        assert temp_files(disk) == []


def test_an_analysis_report_onto_a_full_disk_is_one_line_and_leaves_no_temp_file(tiny, tmp_path):
    """The report's figures, report.md and summary.json go through the same atomic writer as the sweep."""
    root, out = tmp_path / "runs", tmp_path / "results.parquet"
    assert hpt(*sweep_args(tiny, root, "model.width=16,32", "optim.lr=0.004,0.008", "param=sp",
                           "sweep.seeds=[0]")).returncode == 0
    assert hpt("collect", "--root", str(root), "--out", str(out)).returncode == 0
    with tmpfs(tmp_path / "disk") as disk:
        ballast = fill(disk)
        assert_disk_full_line(hpt("analyze", str(out), "--out", str(disk / "report")), 2)
        assert temp_files(disk) == []
        ballast.unlink()
        assert hpt("analyze", str(out), "--out", str(disk / "report")).returncode == 0
        assert (disk / "report" / "report.md").exists() and temp_files(disk) == []


class Requeued(Exception):
    """What submitit's requeue handler does to the process, in kind: an exception out of a signal handler."""


def test_a_signal_during_a_checkpoint_write_acts_after_it_never_as_a_torch_error():
    """SLURM's requeue signal or Ctrl-C arriving inside torch.save's writes to a Python file: torch turns the
    handler's exception into a RuntimeError (the loop would record the run failed, never to train again);
    deferred, the checkpoint is written whole and the handler acts after it."""

    class SignalledMidWrite(io.BytesIO):
        writes = 0

        def write(self, data: bytes) -> int:
            self.writes += 1
            if self.writes == 2:  # inside a record: torch's writer finds its position off and raises its own error
                os.kill(os.getpid(), signal.SIGUSR2)
            return super().write(data)

    def requeue(signum: int, frame: object) -> None:
        raise Requeued

    state = {"w": torch.arange(1000.0)}
    old = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(RuntimeError):  # the failure signals_deferred prevents
            torch.save(state, SignalledMidWrite())
        f = SignalledMidWrite()
        with pytest.raises(Requeued):
            with signals_deferred():
                torch.save(state, f)
            pytest.fail("the held signal's handler did not run after the block")  # pragma: no cover
        assert torch.equal(torch.load(io.BytesIO(f.getvalue()))["w"], state["w"])  # written whole first
    finally:
        signal.signal(signal.SIGUSR2, old)
