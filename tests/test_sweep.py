"""Grid expansion: counts, log2 ranges, Hydra overrides, derived fields, stable run ids; the shipped sweep files."""

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hptransfer.config.compose import compose_file
from hptransfer.config.derived import heads_and_dim
from hptransfer.config.frozen import load_yaml, run_config, run_id, to_yaml
from hptransfer.config.schema import validate
from hptransfer.errors import HptError
from hptransfer.sweeps import collect, launch, plan
from hptransfer.sweeps.store import SweepFolder
from tests.conftest import REPO, assert_one_line_error, cli

TINY_SWEEP = """\
defaults:
  - config
  - _self_
model: {width: 16, n_layers: 1, head_dim: 8}
param: {base_width: 16, base_depth: 1}
train: {steps: 10, batch_size: 4, seq_len: 32, log_every: 5, final_window: 5, val_batches: 2}
sweep:
  name: tiny
  axis: {key: model.width, values: [16, 32]}
  grid:
    optim.lr: {log2: [-8, -6], step: 0.5}
    param: [sp, mup]
  seeds: [0, 1]
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY_SWEEP)
    return f


def test_expansion_crosses_axis_grid_and_seeds(tiny):
    spec = plan.load(tiny)
    assert [d.key for d in spec.dims] == ["model.width", "optim.lr", "param", "train.seed"]
    runs = plan.expand(spec)
    assert len(runs) == 2 * 5 * 2 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    # Config groups are composed as groups: the mup runs carry the mup preset, the file's base width kept.
    mup = [r for r in runs if r.point["param"] == "mup"]
    assert {r.config["param"]["name"] for r in mup} == {"mup"}
    assert {r.config["param"]["base_width"] for r in mup} == {16}
    assert {r.config["model"]["width"] for r in runs} == {16, 32}


def test_log2_range_is_one_line_and_exact(tiny):
    lrs = plan.load(tiny).dims[1].values
    assert lrs == tuple(2.0**e for e in (-8, -7.5, -7, -6.5, -6))
    assert plan._values("w", {"log2": [5, 7]}) == (32, 64, 128)  # whole exponents >= 0: integers
    # The same on the command line, in Hydra's grammar:
    dims = {d.key: d.values for d in plan.load(tiny, ["optim.lr=tag(log2,range(-8,-5.5,0.5))",
                                                        "model.width=tag(log2,choice(4,5))"]).dims}
    assert dims["optim.lr"] == lrs and dims["model.width"] == (16, 32)
    for bad in ({"log2": [-4, -8]}, {"log2": [1]}, {"log2": [0, 2], "step": 0}, {"log2": [0, 2], "base": 10}):
        with pytest.raises(HptError, match="log2"):
            plan._values("sweep.grid.optim.lr", bad)


def test_command_line_sweeps_replace_or_add_dimensions(tiny):
    spec = plan.load(tiny, ["model.width=16,32,64", "param=choice(mup)", "train.seed=range(0,3)",
                             "optim.weight_decay=0,0.1", "train.steps=12"])
    dims = {d.key: d.values for d in spec.dims}
    assert dims["model.width"] == (16, 32, 64)  # the axis key replaces the axis values
    assert dims["param"] == ("mup",)
    assert dims["train.seed"] == (0, 1, 2)
    assert dims["optim.weight_decay"] == (0, 0.1)  # a new dimension, before the seeds
    assert list(dims)[-1] == "train.seed"
    assert spec.overrides == ["train.steps=12"]
    runs = plan.expand(spec)
    assert len(runs) == 3 * 5 * 1 * 3 * 2
    assert {r.config["train"]["steps"] for r in runs} == {12}


def test_plain_override_of_a_swept_key_narrows_it(tiny):
    spec = plan.load(tiny, ["optim.lr=0.01", "param=mup", "sweep.axis.values=[32]"])
    dims = {d.key: d.values for d in spec.dims}
    assert dims["optim.lr"] == (0.01,) and dims["param"] == ("mup",) and dims["model.width"] == (32,)
    assert spec.overrides == ["sweep.axis.values=[32]"]
    assert {r.config["param"]["name"] for r in plan.expand(spec)} == {"mup"}


def test_expansion_equals_composing_each_point_with_hydra(tiny):
    """The plain-data fast path gives every point the config (and id) Hydra's own command line gives it."""
    overrides = ["optim.lr=1,0.5", "param.lr_mult.E=1,2", "train.tokens=2048", "train.seed=0"]
    spec = plan.load(tiny, overrides)
    runs = plan.expand(spec)
    assert len(runs) == 2 * 2 * 2 * 2
    for r in runs:
        line = [f"{k}={v}" for k, v in r.point.items()]
        reference = plan.fill_steps(run_config(compose_file(tiny, [*spec.overrides, *line])))
        assert r.config == reference and r.run_id == run_id(reference)
    assert {type(r.config["optim"]["lr"]) for r in runs} == {float}  # the int 1 typed as the schema says


def test_config_yaml_is_omegaconfs_text_and_reads_back_identical(tiny):
    cfg = plan.expand(plan.load(tiny))[0].config
    for path in ["/tmp/a path: with 'quotes'", "yes", "1e-3", "null", "~", "#x", "a\nb", "é" * 100, ""]:
        cfg = {**cfg, "data": {**cfg["data"], "path": path}, "optim": {**cfg["optim"], "eps": 1e-12, "lr": 3.0}}
        text = to_yaml(cfg)
        assert OmegaConf.to_container(OmegaConf.create(text)) == cfg
        if "\n" not in path:  # a multi-line string is one JSON-quoted line, where OmegaConf folds it
            assert text == OmegaConf.to_yaml(OmegaConf.create(cfg))


def test_run_ids_are_stable_and_follow_the_config(tiny):
    a = {r.run_id: r for r in plan.expand(plan.load(tiny))}
    b = {r.run_id for r in plan.expand(plan.load(tiny, ["launcher.jobs=3"]))}
    assert set(a) == b  # same points, same ids; launcher settings are no part of the identity
    changed = {r.run_id for r in plan.expand(plan.load(tiny, ["train.steps=11"]))}
    assert not changed & set(a)
    # The id is the hash of the frozen config: a job reading config.yaml gets the same id.
    r = next(iter(a.values()))
    f = tiny.parent / "config.yaml"
    f.write_text(to_yaml(r.config))
    assert run_id(load_yaml(f)) == r.run_id


def test_steps_derive_from_tokens_and_batch(tmp_path):
    f = tmp_path / "batch.yaml"
    f.write_text(TINY_SWEEP.replace("steps: 10", "steps: 10, tokens: 4096").replace(
        "axis: {key: model.width, values: [16, 32]}", "axis: {key: train.batch_size, values: [4, 8, 16]}"))
    runs = plan.expand(plan.load(f, ["optim.lr=0.01", "param=sp", "sweep.seeds=[0]"]))
    assert {r.point["train.batch_size"]: r.config["train"]["steps"] for r in runs} == {4: 32, 8: 16, 16: 8}
    fields = plan.derived_fields(runs[0].config)
    assert fields["n_heads"] == 16 // 8 and fields["tokens"] == 4096


def test_interpolations_see_the_swept_value(tmp_path):
    f = tmp_path / "interp.yaml"
    f.write_text(TINY_SWEEP.replace("param: {base_width: 16, base_depth: 1}",
                                    "param: {base_width: '${model.width}', base_depth: 1}"))
    runs = plan.expand(plan.load(f, ["optim.lr=0.01", "param=sp"]))
    assert {r.config["model"]["width"]: r.config["param"]["base_width"] for r in runs} == {16: 16, 32: 32}


def test_bad_sweeps_are_one_line_errors(tiny, tmp_path):
    for args, needle in [
        (["model.width=16,33"], "not divisible"),
        (["optim.lr=interval(0.1,1)"], "only lists"),
        (["modl.width=1,2"], "cannot sweep 'modl.width'"),
        (["model.widht=16,32"], "model.widht"),
        (["optim.lr=[0.1"], "bad override"),
        (["launcher=slurm", "launcher.mem_gb=lots"], "launcher.mem_gb"),
        (["launcher=slurm", "+launcher.gpus=2"], "gpus"),
        (["param=[mup]"], "write param=NAME, or param=A,B"),  # a list where a config group's name goes
    ]:
        assert_one_line_error(cli("sweep", str(tiny), *args, "--dry-run", "--root", str(tmp_path)), needle)
    with pytest.raises(HptError, match="empty grid"):
        plan._values("sweep.grid.optim.lr", [])
    assert_one_line_error(cli("sweep", str(tmp_path / "nope.yaml"), "--dry-run"), "no such config file")
    assert_one_line_error(cli("sweep", str(tiny), "train.seed=1,1", "--dry-run"), "repeats a value")
    # With train.tokens set, steps are derived: sweeping steps would run the same point twice.
    assert_one_line_error(cli("sweep", str(tiny), "train.tokens=4096", "train.steps=10,20", "--dry-run"),
                          "are the same run")


@pytest.mark.parametrize("name", ["width", "depth", "batch", "duration"])
def test_shipped_sweep_files_expand(name):
    spec = plan.load(REPO / "conf" / f"{name}.yaml")
    runs = plan.expand(spec)
    assert spec.name == name and len(runs) >= 20
    assert {d.key for d in spec.dims} >= {"optim.lr", "param"}
    lrs = {d.key: d.values for d in spec.dims}["optim.lr"]
    steps = {math.log2(b / a) for a, b in zip(lrs, lrs[1:], strict=False)}
    assert len(steps) == 1  # an even log2 grid


def test_dry_run_shows_grid_and_compute_and_launches_nothing(tiny, tmp_path):
    res = cli("sweep", str(tiny), "--dry-run", "--root", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    assert "40 runs" in res.stdout and "2^-7.5" in res.stdout and "estimate: 40 runs to launch" in res.stdout
    assert "FLOPs" in res.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("golden_name", "tasks"), [
    ("sbatch_width.sh", []),
    # a run of 2 ranks, a GPU each
    ("sbatch_ddp.sh", ["launcher.tasks_per_node=2", "launcher.gpus_per_node=2", "train.parallel=ddp"]),
])
def test_slurm_dry_run_prints_the_sbatch_script_of_the_golden_file(tmp_path, golden_name, tasks):
    """As submitit's own tests do: the generated sbatch script against tests/golden (paths normalised).

    Regenerate after an intended change with UPDATE_GOLDEN=1.
    """
    res = cli("sweep", str(REPO / "conf" / "width.yaml"), "--root", str(tmp_path), "--dry-run", "launcher=slurm",
              "launcher.partition=gpu", "launcher.account=proj", "launcher.qos=high", "launcher.constraint=h100",
              "launcher.timeout_min=90", "launcher.mem_gb=16", "launcher.array_parallelism=8",
              "launcher.setup=[module load cuda/12.4]", "+launcher.additional.mail-type=END", *tasks)
    assert res.returncode == 0, res.stderr
    assert "84 runs as 1 job array(s)" in res.stdout and "8 at once" in res.stdout
    script = res.stdout[res.stdout.index("#!/bin/bash"):].rstrip() + "\n"
    script = re.sub(rf"{re.escape(str(tmp_path))}/width/slurm/[0-9-]+", "FOLDER", script)
    script = script.replace(sys.executable, "PYTHON")
    golden = REPO / "tests" / "golden" / golden_name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()


def test_run_ids_of_the_shipped_sweep_files_never_change():
    """Upgrading hpt must not rename finished runs (a renamed run is trained again): a key added to the
    run config is registered in schema.LATER_KEYS and, at its default, leaves every id as it was."""
    golden = json.loads((REPO / "tests" / "golden" / "run_ids.json").read_text())
    for name, ids in golden.items():
        assert sorted(r.run_id for r in plan.expand(plan.load(REPO / name))) == ids, name


def test_a_later_key_set_away_from_its_default_makes_a_new_run(tiny):
    base = plan.expand(plan.load(tiny, ["optim.lr=0.01", "sweep.seeds=[0]", "model.width=16", "param=mup"]))
    moved = plan.expand(plan.load(tiny, ["optim.lr=0.01", "sweep.seeds=[0]", "model.width=16", "param=mup",
                                         "param.exponents.R.c=1"]))
    assert {r.run_id for r in base}.isdisjoint(r.run_id for r in moved)
    assert moved[0].config["param"]["exponents"]["R"]["c"] == 1.0  # the frozen config says it all


def test_collect_has_clip_fraction_and_the_decay_timescale_null_for_old_runs(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    spec = plan.load(tiny, ["optim.lr=0.01", "sweep.seeds=[0]", "param=sp"])
    launch.prepare(folder, spec, plan.expand(spec))
    old, new = (r["run_id"] for r in folder.manifest())
    base = {"status": "completed", "final_train_loss": 2.0, "final_val_loss": 2.1, "effective": {"lr": 0.01}}
    (folder.run_dir(old) / "result.json").write_text(json.dumps({"run_id": old, **base}))  # written before both
    (folder.run_dir(new) / "result.json").write_text(json.dumps({
        "run_id": new, **base, "clip_fraction": 0.25, "effective": {"lr": 0.01, "wd_timescale": {"fraction": 0.3}}}))
    table, problems = collect.collect([folder])
    assert problems == [] and str(table.schema.field("clip_fraction").type) == "double"
    rows = {r["run_id"]: r for r in table.to_pylist()}
    assert rows[old]["clip_fraction"] is None and rows[old]["effective.wd_timescale"] is None
    assert rows[new]["clip_fraction"] == 0.25 and rows[new]["effective.wd_timescale"] == 0.3


def test_a_sweep_with_a_mup_preset_and_constant_init_fails_before_launching(tiny, tmp_path):
    res = cli("sweep", str(tiny), "init.scheme=constant", "--dry-run", "--root", str(tmp_path / "runs"))
    assert_one_line_error(res, "init.scheme")  # the grid holds param=mup
    assert not (tmp_path / "runs").exists()


def test_q_per_kv_keeps_the_ratio_along_a_width_sweep(tiny):
    runs = plan.expand(plan.load(tiny, ["model.q_per_kv=2", "optim.lr=0.01", "sweep.seeds=[0]", "param=sp",
                                        "model.width=16,32,64"]))
    heads = {r.config["model"]["width"]: heads_and_dim(validate(r.config).model, r.config["model"]["width"])
             for r in runs}
    assert {w: (h, kv) for w, (h, _, kv) in heads.items()} == {16: (2, 1), 32: (4, 2), 64: (8, 4)}


def test_a_fixed_tokens_per_param_gives_each_width_its_own_tokens(tmp_path):
    """conf/tpp.yaml: tokens = ratio x non-embedding parameters, frozen per run, the same through the fast
    planner and through validating the composed point (hpt train's path), and reloaded unchanged."""
    from hptransfer.config.compose import compose_run
    from hptransfer.config.derived import param_counts

    runs = plan.expand(plan.load(REPO / "conf" / "tpp.yaml", ["optim.lr=0.01", "optim.weight_decay=0.0"]))
    tokens = {}
    for r in runs:
        t, m = r.config["train"], r.config["model"]
        assert t["tokens_per_param"] == 4 and t["tokens"] == round(4 * param_counts(m, 256)[1])
        assert t["steps"] == t["tokens"] // (t["batch_size"] * t["seq_len"])
        tokens[m["width"]] = t["tokens"]
        again = compose_run(["param=mup", "model.n_layers=2", "model.head_dim=16", f"model.width={m['width']}",
                             "train.tokens_per_param=4"])
        assert again.train.tokens == t["tokens"]
        (tmp_path / "config.yaml").write_text(to_yaml(OmegaConf.create(r.config)))
        assert load_yaml(tmp_path / "config.yaml").train.tokens == t["tokens"]  # a frozen run is not refilled
    assert sorted(tokens) == [32, 64, 128] and tokens[32] < tokens[64] < tokens[128]


@pytest.mark.parametrize(("args", "needle"), [
    (["train.tokens_per_param=0"], "'train.tokens_per_param': must be positive, got 0"),
    (["train.tokens=100000"], "'train.tokens': 100000 disagrees with train.tokens_per_param=4"),
])
def test_tokens_per_param_bad_input_is_one_line(tmp_path, args, needle):
    assert_one_line_error(cli("sweep", "tpp", *args, "--dry-run", "--root", str(tmp_path)), needle)
