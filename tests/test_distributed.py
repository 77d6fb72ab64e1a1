"""Distributed runs of the built-in trainer: real processes (torchrun, gloo on CPU), float64 so that sums in
another order agree to ~1e-15. Two processes train the single process's run: the same global batches, the
same loss curve, the same final losses; so do sharded (FSDP2) processes with gradient accumulation, and a
run killed and resumed from its sharded checkpoint. Bad splits are one-line errors before anything starts.

Run as a script (by torchrun, in `test_a_failing_rank_fails_the_run_with_its_traceback`), this file is one
process of a run whose rank 1 fails at its 7th step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hptransfer.config.compose import compose_run
from hptransfer.config.frozen import identity_json, load_yaml, run_config, run_id, to_yaml
from hptransfer.errors import HptError
from hptransfer.train import loop
from hptransfer.train.dist import launch, verify
from hptransfer.train.step import setup
from tests.conftest import REPO, TINY, assert_one_line_error, cli, hpt

EXACT = [*TINY, "train.dtype=float64"]
RESUME = ["train.steps=60", "train.checkpoint_every=10", "train.eval_every=15"]
TOL = 1e-6


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def max_difference(a: Path, b: Path) -> float:
    """The largest difference between two runs' metrics.jsonl (the same lines: steps, losses, evaluations)
    and final losses."""
    la, lb = lines(a), lines(b)
    assert [(r["step"], sorted(r)) for r in la] == [(r["step"], sorted(r)) for r in lb]
    diffs = [abs(x[k] - y[k]) for x, y in zip(la, lb, strict=True) for k in x if k != "step"]
    ra, rb = result(a), result(b)
    assert ra["status"] == rb["status"] == "completed"
    diffs += [abs(ra[k] - rb[k]) for k in ("final_train_loss", "final_val_loss", "initial_loss")]
    return max(diffs)


def single(tmp_path: Path, *overrides: str) -> Path:
    """The one-process run every distributed one is held to."""
    proc = cli("train", *EXACT, *overrides, "--run-dir", str(tmp_path / "single"), "-q")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "single"


def distributed(tmp_path: Path, name: str, *args: str) -> Path:
    proc = hpt("train", *EXACT, "--nproc", "2", *args, "--run-dir", str(tmp_path / name), "-q", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp_path / name


def test_ddp_on_two_processes_trains_the_single_process_run(tmp_path):
    ref, run = single(tmp_path), distributed(tmp_path, "ddp")
    assert max_difference(ref, run) < TOL
    assert load_yaml(run / "config.yaml").train.parallel == "ddp"  # --nproc 2's default
    r = result(run)
    assert r["env"]["processes"] == 2 and r["steps"] == 20 and r["batch_size"] == 4
    assert result(ref)["clip_fraction"] == r["clip_fraction"]
    beat = json.loads((run / "heartbeat-rank1.json").read_text())  # every rank's liveness; rank 0 writes the rest
    assert beat["step"] == 20 and beat["pid"] != json.loads((run / "heartbeat.json").read_text())["pid"]
    assert not (run / "heartbeat-rank0.json").exists()


def test_fsdp_with_gradient_accumulation_trains_the_single_process_run(tmp_path):
    """2 processes x 2 micro-batches of 1 row: the global batch of 4 rows is the single process's."""
    ref, run = single(tmp_path), distributed(tmp_path, "fsdp", "train.parallel=fsdp", "train.grad_accum=2")
    assert max_difference(ref, run) < TOL


def test_a_killed_run_resumes_from_its_sharded_checkpoint(tmp_path):
    """SIGKILL the whole torchrun process group once a checkpoint exists; the same command resumes it on every
    rank. The loop state comes from checkpoint/ (its `initial`, nudged here, is what the result reports), the
    model and optimizer too (the rest of the curve is the uninterrupted one)."""
    ref = single(tmp_path, *RESUME)
    run = tmp_path / "cut"
    cmd = [str(Path(sys.executable).with_name("hpt")), "train", *EXACT, *RESUME, "--nproc", "2",
           "train.parallel=fsdp", "--run-dir", str(run), "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((run / "checkpoint").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted((run / "checkpoint").glob("step-*"))
    assert saved and not (run / "result.json").exists(), proc.stderr.read()
    state = json.loads((saved[-1] / "loop.json").read_text())
    assert 10 <= state["step"] < 60 and len(state["losses"]) == state["step"]
    state["initial"] += 1e-9
    (saved[-1] / "loop.json").write_text(json.dumps(state))
    shutil.copytree(run, tmp_path / "cut-on-one")

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert result(run)["initial_loss"] == state["initial"]
    assert max_difference(ref, run) < TOL
    assert not (run / "checkpoint").exists()  # a finished run keeps no checkpoint

    # The same 2-process checkpoint resumed by one process: the shards are resharded to it.
    one = tmp_path / "cut-on-one"
    proc = cli("train", *EXACT, *RESUME, "train.parallel=fsdp", "--run-dir", str(one), "-q")
    assert proc.returncode == 0, proc.stderr
    assert result(one)["initial_loss"] == state["initial"] and result(one)["env"]["processes"] == 1
    assert max_difference(ref, one) < TOL


def test_a_failing_rank_fails_the_run_with_its_traceback(tmp_path, monkeypatch):
    """Rank 1 raises at its 7th step: rank 0's collective breaks, and it writes the failed result, rank 1's
    traceback first (torchrun, as `hpt train --nproc` starts it, leaves it the time)."""
    run = tmp_path / "fault"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(compose_run([*EXACT, "train.parallel=ddp"])))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert launch(2, [__file__, str(run)]) != 0
    r = result(run)
    assert r["status"] == "failed" and r["error"].startswith("rank 1: RuntimeError: a fault on rank 1"), r["error"]
    assert "Traceback" in r["error"] and "rank 0: " in r["error"]
    assert "a fault on rank 1" in json.loads((run / "heartbeat-rank1.json").read_text())["error"]


@pytest.mark.parametrize("args,needle", [
    (["--nproc", "3"], "train.batch_size': 4 rows do not split into 3 processes x 1 micro-batches"),
    (["--nproc", "2", "train.grad_accum=4"], "multiple of 8"),
    (["train.grad_accum=3"], "train.grad_accum"),
    (["--nproc", "0"], "--nproc 0"),
    (["--nproc", "2", "train.device=cuda"] if not torch.cuda.is_available() else ["--nproc", "99"], "cuda"
     if not torch.cuda.is_available() else "--nproc 99"),
])
def test_a_bad_split_is_one_line_before_anything_starts(tmp_path, args, needle):
    assert_one_line_error(cli("train", *TINY, *args, "--run-dir", str(tmp_path / "x")), needle)
    assert not (tmp_path / "x").exists()


def test_the_default_keys_keep_old_run_ids():
    cfg = compose_run(TINY)
    assert (cfg.train.parallel, cfg.train.grad_accum, cfg.train.dist_timeout_s) == ("none", 1, 600)
    assert all(key not in identity_json(run_config(cfg)) for key in ("parallel", "grad_accum", "dist_timeout_s"))
    assert run_id(compose_run([*TINY, "train.grad_accum=2"])) != run_id(cfg)


def test_verify_catches_a_group_or_a_tensor_that_does_not_match_the_specs():
    s = setup(compose_run(TINY), torch.device("cpu"))
    verify(s.forward, s.specs, s.opt, "independent")  # setup verified it already: no error
    s.opt.param_groups[1]["lr"] *= 2
    with pytest.raises(HptError, match=r"optimizer group 1 trains '.+' with lr .*its spec"):
        verify(s.forward, s.specs, s.opt, "independent")
    s.opt.param_groups[1]["lr"] /= 2
    s.model.lm_head.weight = torch.nn.Parameter(s.model.lm_head.weight.detach().clone())  # as a re-wrap would
    with pytest.raises(HptError, match="no parameter of the model: build the optimizer after wrapping"):
        verify(s.forward, s.specs, s.opt, "independent")
    with pytest.raises(HptError, match="has shape"):
        verify(s.forward, {**s.specs, "norm_f.weight": s.specs["lm_head.weight"]}, s.opt, "independent")


if __name__ == "__main__":  # one process of the failing run: rank 1's 7th step raises
    real, calls = loop.train_step, []

    def failing_step(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 7:
            raise RuntimeError("a fault on rank 1")
        return real(*args)

    loop.train_step = failing_step
    sys.exit(1 if loop.train_folder(Path(sys.argv[1]), in_sweep=False)["status"] == "failed" else 0)
