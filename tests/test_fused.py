"""Fused and packed runs: a fused group trains each run exactly as it trains alone (float64: to 1e-6 at every
step, under every preset and optimizer), a diverged copy stops alone, checkpoints resume per run; tasks group
the right runs; a local sweep fused or packed leaves the folders an unfused one leaves; a packed task's crash
costs only the run it was training."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hptransfer.config.compose import compose_run
from hptransfer.config.derived import fused_bytes, fusion_key
from hptransfer.config.frozen import load_yaml, run_config, run_id, to_yaml
from hptransfer.sweeps.tasks import Packing, Task, plan_tasks
from hptransfer.train import loop
from hptransfer.train.data import make_batches
from hptransfer.train.fused import fuse, fused_evaluate, fused_step
from hptransfer.train.optim import lr_factor, set_lr
from hptransfer.train.step import evaluate, setup, train_step
from tests.conftest import assert_one_line_error, cli, hpt
from tests.test_local import records, status, wait_for
from tests.test_sweep import TINY_SWEEP

CPU = torch.device("cpu")
SMALL = ["model.width=64", "model.n_layers=2", "model.head_dim=16", "param.base_width=32", "param.base_depth=1",
         "train.batch_size=4", "train.seq_len=16", "train.dtype=float64"]
# Copies that differ in everything a fused group may differ in: LR, seed, decay, betas, eps, clipping, per-class
# LR and init constants, the schedule.
COPIES = [
    ["optim.lr=0.01"],
    ["optim.lr=0.003", "train.seed=1", "optim.weight_decay=0.1", "optim.beta2=0.99", "optim.grad_clip=0.05",
     "param.lr_mult.R=2.0", "param.init_mult.H=0.5"],
    ["optim.lr=0.03", "optim.schedule=wsd", "optim.eps=1e-6", "optim.wd_mode=coupled", "optim.weight_decay=0.01"],
]


# Copies whose forwards differ too: the preset, per-class output multipliers, the residual multiplier (CompleteP
# at twice its base depth) and the attention scale (muP's 1/d_head off its base head size, SP's 1/sqrt(d_head),
# muP at its base width); two share muP's scale. Two heads: the head size grows with width.
MIXED = [
    ["param=sp", "optim.lr=0.01"],
    ["param=mup", "optim.lr=0.003", "train.seed=1", "param.out_mult.R=2.0"],
    ["param=completep", "optim.lr=0.03", "param.out_mult.E=0.5"],
    ["param=mup", "optim.lr=0.01", "param.base_width=64"],
    ["param=mup", "optim.lr=0.02", "optim=lion"],
]


def configs(*common: str) -> list:
    return [compose_run([*SMALL, *common, *c]) for c in COPIES]


def mixed(*common: str) -> list:
    two_heads = [*(o for o in SMALL if not o.startswith("model.head_dim")), "model.head_dim=null", "model.n_heads=2"]
    return [compose_run([*two_heads, *common, *c]) for c in MIXED]


def unfused_curve(cfg, steps: int) -> list[float]:  # noqa: ANN001
    s, b = setup(cfg, CPU), make_batches(cfg)
    out = []
    for step in range(steps):
        set_lr(s.opt, lr_factor(step, steps, cfg))
        out.append(float(train_step(s, *b.train_batch(step, CPU))))
    return [*out, evaluate(s, b, 2)]


def fused_curves(cfgs: list, steps: int) -> list[list[float]]:
    g, bs = fuse(cfgs, CPU), [make_batches(c) for c in cfgs]
    out: list[list[float]] = [[] for _ in cfgs]
    for step in range(steps):
        for c, s in zip(cfgs, g.setups, strict=True):
            set_lr(s.opt, lr_factor(step, steps, c))
        xy = [b.train_batch(step, CPU) for b in bs]
        losses = fused_step(g, torch.stack([x for x, _ in xy]), torch.stack([y for _, y in xy]), [True] * len(cfgs))
        for n in range(len(cfgs)):
            out[n].append(float(losses[n]))
    for n, v in enumerate(fused_evaluate(g, bs[0], 2)):
        out[n].append(v)
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


@pytest.mark.parametrize("preset", ["sp", "sp_emb", "sp_perlayer", "ntk", "mfp", "mup_everett", "mup", "completep",
                                    "depth_mup"])
def test_a_fused_group_trains_each_copy_as_it_trains_alone_under_every_preset(preset):
    cfgs = configs(f"param={preset}", "train.grad_accum=2", "model.pos=learned")
    fused = fused_curves(cfgs, 6)
    assert max_diff(fused, [unfused_curve(c, 6) for c in cfgs]) < 1e-6
    assert len({round(c[-1], 6) for c in fused}) == 3  # the copies really differ


@pytest.mark.parametrize("optim", ["sgd", "lion", "adafactor", "muon", "adam_atan2"])
def test_a_fused_group_trains_each_copy_as_it_trains_alone_under_every_optimizer(optim):
    cfgs = configs("param=mup", f"optim={optim}")
    assert max_diff(fused_curves(cfgs, 6), [unfused_curve(c, 6) for c in cfgs]) < 1e-6


def test_copies_whose_forwards_differ_keep_their_own_multipliers_and_train_as_they_train_alone():
    cfgs = mixed("train.grad_accum=2", "model.pos=learned")
    assert len({fusion_key(run_config(c)) for c in cfgs}) == 1
    g = fuse(cfgs, CPU)
    # per copy what the copies do not share (else it would not be tested), a constant what they share
    assert isinstance(g.model.lm_head.mult, torch.Tensor) and g.model.lm_head.mult.tolist()[1] == 2.0 * \
        g.model.lm_head.mult.tolist()[4]
    assert isinstance(g.model.emb_mult, torch.Tensor) and isinstance(g.model.pos_mult, torch.Tensor)
    assert isinstance(g.model.blocks[0].res_mult, torch.Tensor) and g.model.blocks[0].res_mult.tolist()[2] == 0.5
    scales = g.model.blocks[0].attn.scale
    # muP's 1/d_head (copies 1, 2, 4), SP's 1/sqrt(d_head), muP at its base (equal to SP's but for rounding)
    assert isinstance(scales, dict) and sorted(i for idx in scales.values() for i in idx.tolist()) == [0, 1, 2, 3, 4]
    assert [1, 2, 4] in [idx.tolist() for idx in scales.values()]
    assert max_diff(fused_curves(cfgs, 6), [unfused_curve(c, 6) for c in cfgs]) < 1e-6


def test_only_runs_of_one_shape_share_a_model():
    mup = compose_run([*SMALL, "param=mup"])
    key = fusion_key(run_config(mup))
    assert key is not None and key == fusion_key(run_config(compose_run([*SMALL, "param=sp", "optim=lion",
                                                                         "param.out_mult.R=4", "optim.lr=1",
                                                                         "train.seed=3"])))
    for other in ("model.width=128", "train.steps=50", "train.batch_size=8", "train.log_every=5", "data.val_frac=0.1"):
        assert fusion_key(run_config(compose_run([*SMALL, "param=mup", other]))) != key, other
    assert fusion_key({**run_config(mup), "run": {"target": "m:f"}}) is None  # the user's code trains alone


def cfg_of(width: int, lr: float, param: str = "mup") -> dict:
    return run_config(compose_run([*SMALL, f"model.width={width}", f"optim.lr={lr}", f"param={param}"]))


def test_tasks_fuse_by_key_split_evenly_and_pack_units():
    cfgs = {f"{w}-{p}-{i}": cfg_of(w, 2.0**-i, p) for w in (32, 64) for p in ("sp", "mup") for i in range(7)}
    ids = list(cfgs)
    assert plan_tasks(ids, cfgs, Packing()) == [Task(((rid,),)) for rid in ids]
    tasks = plan_tasks(ids, cfgs, Packing(fuse=4))
    units = [u for t in tasks for u in t.units]
    assert sorted(map(len, units)) == [3, 3, 3, 3, 4, 4, 4, 4]  # 14 runs of each width (both presets): 4+4+3+3
    assert all(len({cfgs[r]["model"]["width"] for r in u}) == 1 for u in units)
    whole = [u for t in plan_tasks(ids, cfgs, Packing(fuse=14)) for u in t.units]
    assert [len({cfgs[r]["param"]["name"] for r in u}) for u in whole] == [2, 2]  # the presets share a model
    assert sorted(rid for t in tasks for rid in t.run_ids) == sorted(ids)
    packed = plan_tasks(ids, cfgs, Packing(fuse=1, runs_per_task=5))
    assert [len(t.units) for t in packed] == [5, 5, 5, 5, 5, 3] and all(len(u) == 1 for t in packed for u in t.units)
    assert packed[1].position(ids[7]) == 2
    # auto: the memory budget bounds the copies, and no slot is left without a group
    one = fused_bytes(cfgs[ids[0]])
    assert max(map(len, (u for t in plan_tasks(ids, cfgs, Packing(None, 1, 3 * one, None)) for u in t.units))) == 3
    assert len(plan_tasks(ids[:7], cfgs, Packing(None, 1, None, 2))) == 4  # 2 slots: 3 groups each at most
    assert len(plan_tasks(ids[:7], cfgs, Packing(None, 1, None, 1))) == 1  # one slot: one group


def frozen_dirs(root: Path, cfgs: list) -> list[Path]:
    dirs = []
    for c in cfgs:
        d = root / "sw" / run_id(c)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(to_yaml(c))
        dirs.append(d)
    return dirs


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_folders(a: Path, b: Path, tol: float) -> None:
    """Two folders of one run: the same metric lines (values within tol) and result.json fields and values."""
    la, lb = lines(a), lines(b)
    assert [sorted(x) for x in la] == [sorted(y) for y in lb] and [x["step"] for x in la] == [y["step"] for y in lb]
    for x, y in zip(la, lb, strict=True):
        for k in ("loss", "val_loss"):
            if x.get(k) is not None:
                assert abs(x[k] - y[k]) < tol * max(1, abs(y[k])), (a, x, y)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert set(ra) == set(rb) and set(ra["env"]) - {"fused"} == set(rb["env"])
    timing = {"wall_s", "tokens_per_s", "env", "final_train_loss", "final_val_loss", "initial_loss"}
    assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
    for k in ("final_train_loss", "final_val_loss", "initial_loss"):
        assert (ra[k] is None) == (rb[k] is None) and (ra[k] is None or abs(ra[k] - rb[k]) < tol * abs(rb[k]))


def test_a_fused_group_writes_the_folders_unfused_runs_write_and_a_diverged_copy_stops_alone(tmp_path):
    cfgs = [compose_run([*SMALL, "param=mup", "train.steps=20", "train.log_every=5", "train.eval_every=10", *c])
            for c in [*COPIES, ["optim.lr=30", "optim.grad_clip=0"]]]
    dirs = frozen_dirs(tmp_path / "fused", cfgs)
    results = loop.train_group(dirs, sweep="sw")
    assert [r["status"] for r in results] == ["completed"] * 3 + ["diverged"]
    assert all(r["env"]["fused"] == 4 for r in results)
    for c, d in zip(cfgs, dirs, strict=True):
        alone = tmp_path / "alone" / d.name
        loop.train(c, alone, progress=False, sweep="sw")
        assert_same_folders(d, alone, 1e-6)
    assert not [p for d in dirs for p in d.glob("checkpoint*")]
    assert loop.train_group(dirs, sweep="sw") == results  # finished: never trained again


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp32_and_bf16_fused_runs_match_unfused_within_the_stated_tolerance(tmp_path, dtype):
    cfgs = mixed(f"train.dtype={dtype}", "train.steps=30")  # forwards that differ: multipliers per copy too
    dirs = frozen_dirs(tmp_path / "fused", cfgs)
    loop.train_group(dirs, sweep="sw")
    for c, d in zip(cfgs, dirs, strict=True):
        loop.train(c, tmp_path / "alone" / d.name, progress=False, sweep="sw")
        assert_same_folders(d, tmp_path / "alone" / d.name, 1e-4)  # docs/performance.md: within 1e-4


def test_a_compiled_fused_group_trains_as_the_eager_one():
    eager = fused_curves(mixed("train.dtype=float32"), 3)
    compiled = fused_curves(mixed("train.dtype=float32", "train.compile=true"), 3)
    assert max_diff(eager, compiled) < 1e-4


def job(units: list[list[Path]], log: Path) -> subprocess.Popen:
    spec = json.dumps([{"runs": [str(d) for d in u], "log": str(log)} for u in units])
    return subprocess.Popen([sys.executable, "-m", "hptransfer.sweeps.job", spec], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_killed_fused_group_resumes_each_run_from_its_own_checkpoint(tmp_path):
    common = ["param=mup", "train.steps=400", "train.log_every=20", "train.checkpoint_every=100",
              "train.eval_every=100"]
    cfgs = [compose_run([*SMALL, *common, *c]) for c in COPIES]
    dirs = frozen_dirs(tmp_path / "fused", cfgs)
    (tmp_path / "sw").mkdir()
    proc = job([dirs], tmp_path / "job.log")
    wait_for(lambda: all((d / "checkpoint.pt").exists() for d in dirs) or proc.poll() is not None, 300,
             "the group's first checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any((d / "result.json").exists() for d in dirs), "killed too late: raise train.steps"
    steps = [torch.load(d / "checkpoint.pt", weights_only=False)["step"] for d in dirs]
    assert len(set(steps)) == 1 and 0 < steps[0] < 400
    # one copy's weights, not the group's stack
    size = (dirs[0] / "checkpoint.pt").stat().st_size
    assert size < 2 * sum(p.numel() for p in setup(cfgs[0], CPU).model.parameters()) * 8 * 3 + 200_000
    # the first resumes alone (a fused checkpoint is an unfused run's), the others together
    loop.train(cfgs[0], dirs[0], progress=False, sweep="sw")
    assert all(r["status"] == "completed" for r in loop.train_group(dirs[1:], sweep="sw"))
    for c, d in zip(cfgs, dirs, strict=True):
        loop.train(c, tmp_path / "alone" / d.name, progress=False, sweep="sw")
        assert_same_folders(d, tmp_path / "alone" / d.name, 1e-6)


def test_a_packed_task_survives_a_bad_run_and_logs_each_run_apart(tmp_path):
    cfgs = [compose_run([*SMALL, "param=mup", "train.steps=10", *c]) for c in COPIES]
    dirs = frozen_dirs(tmp_path, cfgs)
    (dirs[1] / "config.yaml").write_text("model: {width: [\n")  # truncated: this run fails, alone
    logs = [d / "logs" / "attempt-1.log" for d in dirs]
    for log in logs:
        log.parent.mkdir()
    spec = json.dumps([{"runs": [str(d)], "log": str(log)} for d, log in zip(dirs, logs, strict=True)])
    proc = subprocess.run([sys.executable, "-m", "hptransfer.sweeps.job", spec], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1  # a run failed
    statuses = [json.loads((d / "result.json").read_text())["status"] for d in dirs]
    assert statuses == ["completed", "failed", "completed"]
    assert "config.yaml" in json.loads((dirs[1] / "result.json").read_text())["error"]
    for n, (d, log) in enumerate(zip(dirs, logs, strict=True)):  # each run's output in its own log
        assert f"run {n + 1} of 3 of this task: {d.name}" in log.read_text()
    index = [json.loads(x)["run_id"] for x in (tmp_path / "sw" / "results.jsonl").read_text().splitlines()]
    assert sorted(index) == sorted([dirs[0].name, dirs[2].name])


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY_SWEEP.replace("steps: 10,", "steps: 10, dtype: float64,"))
    return f


def sweep(tiny: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    """The tiny sweep at width 32 (over base 16): 5 LRs x SP, muP."""
    return hpt("sweep", str(tiny), "--root", str(root), "-j", "2", "sweep.axis.values=[32]", "sweep.seeds=[0]", *args)


def alone(run_dir: Path, dest: Path) -> Path:
    """The run of this folder's config.yaml trained alone, here in this process, into dest/<run_id>."""
    loop.train(load_yaml(run_dir / "config.yaml"), dest / run_dir.name, progress=False, sweep=run_dir.parent.name)
    return dest / run_dir.name


def test_fused_and_packed_local_sweeps_leave_the_folders_an_unfused_sweep_leaves(tiny, tmp_path):
    fused = sweep(tiny, tmp_path / "fused", "launcher.fuse=auto")
    assert fused.returncode == 0, fused.stderr
    assert "fused into" in fused.stdout and "launcher.fuse=auto" in fused.stdout
    packed = sweep(tiny, tmp_path / "packed", "launcher.fuse=3", "launcher.runs_per_task=2")
    assert packed.returncode == 0, packed.stderr
    ids = sorted(p.name for p in (tmp_path / "fused" / "tiny").iterdir() if (p / "result.json").exists())
    assert len(ids) == 10 and ids == sorted(p.name for p in (tmp_path / "packed" / "tiny").iterdir()
                                            if (p / "result.json").exists())
    for rid in ids:  # each run as it trains alone (an unfused sweep's job trains it so)
        plain = alone(tmp_path / "fused" / "tiny" / rid, tmp_path / "plain")
        for other in ("fused", "packed"):
            assert_same_folders(tmp_path / other / "tiny" / rid, plain, 1e-6)
    for other in ("fused", "packed"):
        assert all(s["state"] == "completed" for s in status(tmp_path / other).values())
        out = tmp_path / f"{other}.parquet"
        assert hpt("collect", "--root", str(tmp_path / other), "--out", str(out)).returncode == 0
        sizes = pq.read_table(out, columns=["env.fused"]).column(0).to_pylist()
        # the size of the group each run trained in: auto, 10 runs of one shape (SP and muP together) on 2
        # slots, about 3 groups each: 5 groups of 2; 3 at most, split evenly
        assert sorted(sizes) == ([2] * 10 if other == "fused" else [2] * 4 + [3] * 6), sizes
    started = records(tmp_path / "fused", "started")
    assert len({r["pid"] for r in started}) == len(started) / 2  # runs shared processes, two to one
    for rid in ids:  # each run has its attempt log; a fused copy's names the group's
        assert (tmp_path / "fused" / "tiny" / rid / "logs" / "attempt-1.log").exists()


def test_a_packed_task_killed_midway_keeps_what_ended_and_the_next_sweep_finishes_it(tiny, tmp_path):
    root = tmp_path / "r"
    long = ["train.steps=400", "train.log_every=20", "launcher.runs_per_task=10", "-j", "1", "--detach"]
    assert sweep(tiny, root, *long).returncode == 0
    done = wait_for(lambda: [r for r in status(root).values() if r["state"] == "completed"], 300, "a first run")
    states = status(root)
    waiting = [r for r in states.values() if r["state"] == "pending"]
    assert waiting and all("packed" in r["reason"] for r in waiting), states
    pid = records(root, "started")[0]["pid"]
    os.killpg(pid, signal.SIGKILL)  # the task's process dies midway

    def settled() -> dict | None:
        st = status(root)
        return None if any(r["state"] in ("pending", "running") for r in st.values()) else st

    after = wait_for(settled, 60, "the scheduler to record the task's end")
    by_state: dict[str, list] = {}
    for r in after.values():
        by_state.setdefault(r["state"], []).append(r)
    assert len(by_state["completed"]) >= len(done), after
    assert len(by_state.get("failed", [])) == 1, by_state  # the run it was training
    assert len(by_state["cancelled"]) >= 1 and all("before reaching it" in r["reason"] for r in by_state["cancelled"])
    again = sweep(tiny, root, "train.steps=400", "train.log_every=20", "launcher.runs_per_task=5", "--retry-failed")
    assert again.returncode == 0, again.stderr
    assert all(r["state"] == "completed" for r in status(root).values())


@pytest.mark.parametrize(("args", "needle"), [
    (["launcher.fuse=0"], "launcher.fuse"),
    (["launcher.fuse=many"], "launcher.fuse"),
    (["launcher.runs_per_task=0"], "launcher.runs_per_task"),
    (["launcher.fuse_mem_gb=-1"], "launcher.fuse_mem_gb"),
    (["launcher=slurm", "launcher.tasks_per_node=2", "launcher.gpus_per_node=2", "launcher.fuse=4",
      "train.parallel=ddp"], "launcher.fuse"),
    (["launcher=slurm", "launcher.fuse=auto"], "launcher.fuse_mem_gb"),
])
def test_bad_fusion_settings_are_one_line_errors_before_anything_is_written(tiny, tmp_path, args, needle):
    proc = cli("sweep", str(tiny), "--root", str(tmp_path / "r"), *args)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "r").exists()
