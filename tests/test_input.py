"""Bad input is one line, exit 2, and nothing on disk touched; a sweep with failed runs says so (issue 11, 5-8).

Launcher values (5), the failed-run message and exit code (6), data sources checked at submission (7),
`hpt collect --out` and mistyped keys (8). The SLURM-side parts of 5 (attempt logs, ghost arrays) run on
the real cluster in tests/test_slurm.py.
"""

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hptransfer.errors import HptError
from hptransfer.sweeps import launch, plan
from hptransfer.sweeps.store import SweepFolder
from hptransfer.train import data
from tests.conftest import TINY, assert_one_line_error, cli
from tests.test_sweep import TINY_SWEEP

ONE = ["optim.lr=0.01", "param=sp", "model.width=16", "sweep.seeds=[0]"]  # one run of the tiny sweep


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY_SWEEP)
    return f


def tokens_file(path: Path, n: int, top: int, at: int = -1) -> Path:
    """A uint16 token file of n tokens whose largest id is `top` (at token `at`)."""
    ids = np.arange(n, dtype=np.int64) % min(top, 200)
    ids[at] = top
    ids.astype(np.uint16).tofile(path)
    return path


# ---- 5: launcher values ------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "needle"), [
    ("launcher.mem_gb=-1", "'launcher.mem_gb': must be positive, got -1"),
    ("launcher.mem_gb=0", "'launcher.mem_gb': must be positive"),
    ("launcher.timeout_min=0", "'launcher.timeout_min': must be >= 1, got 0"),
    ("launcher.timeout_min=1", "set launcher.signal_delay_s to at most 30 or launcher.timeout_min to at least 2"),
    ("launcher.array_parallelism=0", "'launcher.array_parallelism': must be >= 1"),
    ("launcher.cpus_per_task=0", "'launcher.cpus_per_task': must be >= 1"),
    ("launcher.gpus_per_node=-1", "'launcher.gpus_per_node': must be >= 0"),
    ("launcher.max_requeue=-1", "'launcher.max_requeue': must be >= 0"),
    ("launcher.max_array_size=0", "'launcher.max_array_size': must be >= 1"),
    ("launcher.nodes=0", "'launcher.nodes': must be >= 1, got 0"),
    ("launcher.tasks_per_node=0", "'launcher.tasks_per_node': must be >= 1, got 0"),
    ("launcher.tasks_per_node=2", "each task needs a GPU of its own: set launcher.gpus_per_node=2"),  # 1 GPU
    # Two processes per run: the runs must be able to share the model and split their batch.
    ("launcher.tasks_per_node=2 launcher.gpus_per_node=0", "'train.parallel': none, but the run has 2 processes"),
    ("launcher.tasks_per_node=2 launcher.gpus_per_node=0 train.parallel=ddp train.batch_size=5",
     "5 rows do not split into 2 processes x 1 micro-batches"),
])
def test_slurm_launcher_values_are_checked_before_anything_is_written(tiny, tmp_path, override, needle):
    root = tmp_path / "runs"
    for extra in (["--dry-run"], []):  # the dry run refuses them too, and a real launch writes nothing
        assert_one_line_error(cli("sweep", str(tiny), *ONE, "launcher=slurm", *override.split(), "--root", str(root),
                                  *extra), needle)
    assert not root.exists()


def test_the_requeue_signal_must_leave_an_attempt_time_to_train(tiny, tmp_path):
    root = str(tmp_path / "runs")
    # 90 s before a one-minute limit: the signal would come before the run could do anything.
    res = cli("sweep", str(tiny), *ONE, "launcher=slurm", "launcher.timeout_min=1", "--dry-run", "--root", root)
    assert_one_line_error(res, "leaves each attempt 0 s before it is signalled")
    ok = cli("sweep", str(tiny), *ONE, "launcher=slurm", "launcher.timeout_min=1", "launcher.signal_delay_s=30",
             "--dry-run", "--root", root)
    assert ok.returncode == 0, ok.stderr  # 30 s to train: the floor
    assert_one_line_error(cli("sweep", str(tiny), *ONE, "launcher=slurm", "launcher.timeout_min=1",
                              "launcher.signal_delay_s=31", "--dry-run", "--root", root), "launcher.signal_delay_s")


@pytest.mark.parametrize("returncode", [-signal.SIGTERM, 1])
def test_a_requeue_whose_scontrol_slurm_stopped_counts_as_requeued(monkeypatch, returncode):
    """SLURM stops a task it requeues, sometimes with the task's `scontrol requeue` not yet exited: that
    scontrol's SIGTERM must not surface in training as an error (the run would be recorded failed)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    from hptransfer.sweeps.backends import slurm

    def requeue(env: SlurmJobEnvironment, countdown: int) -> None:
        raise subprocess.CalledProcessError(returncode, ["scontrol", "requeue", "7"])

    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", requeue)
    slurm._survive_requeue_race()
    env = object.__new__(SlurmJobEnvironment)
    if returncode == -signal.SIGTERM:
        env._requeue(2)  # requeued: submitit goes on to exit as after any requeue
    else:
        with pytest.raises(subprocess.CalledProcessError):  # scontrol itself failed: not requeued
            env._requeue(2)


# ---- 6: failed runs ----------------------------------------------------------------------------------


def test_a_sweep_with_failed_runs_says_how_many_and_exits_1_until_they_are_relaunched(tiny, tmp_path):
    root = tmp_path / "runs"
    args = ["optim.lr=0.004,0.008", "param=sp", "model.width=16", "sweep.seeds=[0]"]
    spec = plan.load(tiny, args)
    folder = SweepFolder(root / "tiny")
    launch.prepare(folder, spec, plan.expand(spec))
    ok, bad = (r["run_id"] for r in folder.manifest())
    losses = {"final_train_loss": 2.0, "final_val_loss": 2.1, "steps": 10}
    (folder.run_dir(ok) / "result.json").write_text(json.dumps({"run_id": ok, "status": "completed", **losses}))
    (folder.run_dir(bad) / "result.json").write_text(json.dumps({
        "run_id": bad, "status": "failed", "error": "RuntimeError: boom", "final_train_loss": None,
        "final_val_loss": None}))
    again = cli("sweep", str(tiny), *args, "--root", str(root), "-j", "1")
    assert again.returncode == 1, again.stdout + again.stderr
    assert "nothing to launch: all 2 runs have results or live jobs; 1 failed run: --retry-failed relaunches it" \
        in again.stdout
    retry = cli("sweep", str(tiny), *args, "--root", str(root), "-j", "1", "--retry-failed")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "1 runs ended (1 completed)" in retry.stdout and "failed run" not in retry.stdout
    done = cli("sweep", str(tiny), *args, "--root", str(root), "-j", "1")
    assert done.returncode == 0 and "nothing to launch: all 2 runs have results or live jobs (" in done.stdout


# ---- 7: data sources ---------------------------------------------------------------------------------


def test_a_missing_data_file_stops_the_sweep_and_hpt_train_before_anything_is_written(tiny, tmp_path):
    root = tmp_path / "runs"
    for launcher in ([], ["launcher=slurm"]):
        for extra in (["--dry-run"], []):
            res = cli("sweep", str(tiny), *ONE, "data=text", "data.path=/nonexistent", *launcher, *extra,
                      "--root", str(root))
            assert_one_line_error(res, "config key 'data.path': no such file: /nonexistent")
    assert not root.exists()
    run_dir = tmp_path / "train"
    assert_one_line_error(cli("train", *TINY, "data=text", "data.path=/nonexistent", "--run-dir", str(run_dir)),
                          "no such file")
    assert not run_dir.exists()


def test_bad_data_files_are_one_line_errors_naming_the_problem(tiny, tmp_path):
    root = tmp_path / "runs"
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_text("x" * 60)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    cases = [
        (["data=text", f"data.path={tmp_path / 'empty.txt'}"], "file is empty"),
        (["data=text", f"data.path={tmp_path}"], "is a directory, not a data file"),
        (["data=tokens", f"data.path={tmp_path / 'odd.bin'}"], "not a uint16 token file (odd byte count)"),
        # seq_len 32 needs 34 tokens per split: 60 bytes with val_frac 0.05 give the validation 3
        (["data=text", f"data.path={tmp_path / 'short.txt'}"], "60 tokens are too few for seq_len 32"),
        (["data=text", f"data.path={tmp_path / 'short.txt'}", "data.vocab_size=100"], "needs vocab_size >= 256"),
        (["train.seq_len=300000"], "config key 'train.seq_len'"),  # the built-in corpus: 5% is ~240k bytes
    ]
    for args, needle in cases:
        assert_one_line_error(cli("sweep", str(tiny), *ONE, *args, "--dry-run", "--root", str(root)), needle)
    assert not root.exists()


def test_a_token_id_beyond_the_vocabulary_is_an_error_at_submission_and_in_hpt_train(tiny, tmp_path):
    bad = tokens_file(tmp_path / "bad.bin", 20_000, 300)
    root = tmp_path / "runs"
    res = cli("sweep", str(tiny), *ONE, "data=tokens", f"data.path={bad}", "data.vocab_size=256", "--root", str(root))
    assert_one_line_error(res, "holds token id 300 (at token 19999), but vocab_size is 256: set data.vocab_size=301")
    assert not root.exists()
    run_dir = tmp_path / "train"
    assert_one_line_error(cli("train", *TINY, "data=tokens", f"data.path={bad}", "data.vocab_size=256",
                              "--run-dir", str(run_dir)), "data.vocab_size=301")
    assert not run_dir.exists()
    spec = plan.load(tiny, [*ONE, "data=tokens", f"data.path={bad}", "data.vocab_size=301"])
    assert len(plan.expand(spec)) == 1 and spec.notes == []  # a file this small is read whole


def test_each_distinct_data_source_is_checked_once_not_per_run(tiny, tmp_path, monkeypatch):
    calls = []
    real = plan.check_source
    monkeypatch.setattr(plan, "check_source", lambda d, seq_len: calls.append((d["val_frac"], seq_len)) or
                        real(d, seq_len))
    runs = plan.expand(plan.load(tiny))  # 40 runs, one data source
    assert len(runs) == 40 and calls == [(0.05, 32)]
    calls.clear()
    plan.expand(plan.load(tiny, ["data.val_frac=0.05,0.1", "train.seq_len=32,16"]))
    assert sorted(calls) == [(0.05, 16), (0.05, 32), (0.1, 16), (0.1, 32)]


def test_a_large_token_file_is_checked_on_a_sample_and_says_so(tiny, tmp_path, monkeypatch):
    f = tokens_file(tmp_path / "big.bin", 200_000, 300, at=100_000)  # between the sampled blocks
    monkeypatch.setattr(data, "FULL_SCAN_BYTES", 1000)  # "large" for the test
    monkeypatch.setattr(data, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(data, "SAMPLE_BLOCK_TOKENS", 1000)
    data._largest_token.cache_clear()
    src = {"name": "tokens", "path": str(f), "vocab_size": 256, "val_frac": 0.05}
    note = data.check_source(src, 32)
    assert note and "checked below data.vocab_size=256 on 4 evenly spaced blocks" in note
    spec = plan.load(tiny, [*ONE, "data=tokens", f"data.path={f}", "data.vocab_size=256"])
    plan.expand(spec)
    assert spec.notes == [note]  # `hpt sweep` prints it as a note
    # A batch that meets the id the sample missed fails its run with an error that names it.
    batches = data.Batches(np.array([1, 2, 300, 4] * 20, dtype=np.uint16), np.array([1] * 80, dtype=np.uint16),
                           2, 8, 0, vocab_size=256)
    with pytest.raises(HptError, match="token id 300 in the data is >= vocab_size 256"):
        for step in range(20):
            batches.train_batch(step, __import__("torch").device("cpu"))
    data._largest_token.cache_clear()


def test_the_built_in_corpus_is_at_least_the_size_the_fast_check_assumes():
    assert len(data.shakespeare_bytes()) >= data.SHAKESPEARE_MIN_BYTES


# ---- 8: collect --out, mistyped keys ---------------------------------------------------------------


def test_collect_into_a_missing_folder_is_an_error_that_creates_nothing(tiny, tmp_path):
    root = tmp_path / "runs"
    spec = plan.load(tiny, ONE)
    launch.prepare(SweepFolder(root / "tiny"), spec, plan.expand(spec))
    res = cli("collect", "--root", str(root), "--out", str(tmp_path / "nonexistent" / "dir" / "x.parquet"))
    assert_one_line_error(res, "no folder")
    assert not (tmp_path / "nonexistent").exists()
    assert_one_line_error(cli("collect", "--root", str(root), "--out", str(tmp_path)), "is a folder")
    ok = cli("collect", "--root", str(root), "--out", str(tmp_path / "x.parquet"))
    assert ok.returncode == 0 and (tmp_path / "x.parquet").is_file(), ok.stderr


def test_a_mistyped_key_names_the_nearest_valid_one(tiny, tmp_path):
    root = str(tmp_path / "runs")
    for args in (["model.widht=64"], ["+model.widht=64"]):
        assert_one_line_error(cli("sweep", str(tiny), *args, "--dry-run", "--root", root),
                              "config key 'model.widht' does not exist: did you mean model.width?")
        assert_one_line_error(cli("train", *args, "--run-dir", str(tmp_path / "train")),
                              "did you mean model.width?")
    assert_one_line_error(cli("sweep", str(tiny), "modl.width=64", "--dry-run", "--root", root),
                          "config key 'modl.width' does not exist: did you mean model.width?")
    assert_one_line_error(cli("sweep", str(tiny), "launcher=slurm", "launcher.partiton=gpu", "--dry-run",
                              "--root", root), "did you mean launcher.partition?")
    assert_one_line_error(cli("sweep", str(tiny), "launcher=slurm", "+launcher.partiton=gpu", "--dry-run",
                              "--root", root), "did you mean launcher.partition?")
    res = cli("sweep", str(tiny), "model.foo=1", "--dry-run", "--root", root)
    assert_one_line_error(res, "config key 'model.foo' does not exist (model has: ")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "train").exists()


def test_a_bad_swept_value_names_its_key_once(tiny, tmp_path):
    res = cli("sweep", str(tiny), "sweep.axis.values=[32,abc]", "--dry-run", "--root", str(tmp_path))
    assert_one_line_error(res, "config key 'model.width': Value 'abc'")
    assert "model.model" not in res.stderr
    assert_one_line_error(cli("sweep", str(tiny), "optim.lr=0.1,abc", "--dry-run", "--root", str(tmp_path)),
                          "config key 'optim.lr': Value 'abc'")
