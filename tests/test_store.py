"""The sweep folder: frozen configs, manifest union, definition checks, result and record parsing, collect's schema."""

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hptransfer import views
from hptransfer.errors import HptError
from hptransfer.sweeps import collect, launch, plan
from hptransfer.sweeps.backends.slurm import _expand_ids
from hptransfer.sweeps.state import run_states
from hptransfer.sweeps.store import RunState, SweepFolder, read_result, result_key
from tests.test_sweep import TINY_SWEEP


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(TINY_SWEEP)
    return f


def ids_of(folder: SweepFolder) -> list[str]:
    return [r["run_id"] for r in folder.manifest()]


def save(folder: SweepFolder, file: Path, *overrides: str) -> int:
    spec = plan.load(file, list(overrides))
    return launch.prepare(folder, spec, plan.expand(spec))


def test_save_freezes_configs_and_only_adds_points(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    assert save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]") == 4
    ids = ids_of(folder)
    frozen = (folder.run_dir(ids[0]) / "config.yaml").read_text()
    assert frozen.startswith("# frozen by hpt sweep at ") and "git commit" in frozen
    assert "launcher" not in frozen  # launcher settings are not part of a run
    assert json.loads(folder.manifest()[0]["config"])["model"]["width"] == 16
    # Widening adds rows and keeps the old ones (and their frozen configs, byte for byte).
    assert save(folder, tiny, "optim.lr=0.01,0.02", "sweep.seeds=[0]") == 4
    assert ids_of(folder)[:4] == ids and len(ids_of(folder)) == 8
    assert (folder.run_dir(ids[0]) / "config.yaml").read_text() == frozen
    # A narrower grid is the same definition: nothing new, nothing lost.
    assert save(folder, tiny, "optim.lr=0.02", "sweep.seeds=[0]") == 0 and len(ids_of(folder)) == 8
    # Launcher settings may change between launches.
    assert save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]", "launcher.jobs=4") == 0
    assert not list(folder.path.rglob("*.tmp"))  # every file renamed into place, no temp file left


def test_many_atomic_writes_leave_nothing_half_written(tmp_path, monkeypatch):
    from hptransfer import files as hio

    files = {tmp_path / f"run{i}" / "config.yaml": f"x: {i}\n" for i in range(3)}
    hio.write_many_atomic(files)
    assert [p.read_text() for p in files] == ["x: 0\n", "x: 1\n", "x: 2\n"]
    monkeypatch.setattr(hio, "sync_filesystem", lambda path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        hio.write_many_atomic({p: "x: changed\n" for p in files} | {tmp_path / "new" / "config.yaml": "y"})
    assert [p.read_text() for p in files] == ["x: 0\n", "x: 1\n", "x: 2\n"]  # the old files stand
    assert not (tmp_path / "new" / "config.yaml").exists() and not list(tmp_path.rglob("*.tmp"))


def test_a_different_definition_under_the_same_name_is_refused(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]")
    with pytest.raises(HptError, match=r"different definition \(train.steps: 10 -> 12\).*--name"):
        save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]", "train.steps=12")
    with pytest.raises(HptError, match="swept keys"):
        save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]", "optim.weight_decay=0,0.1")
    tiny.write_text(TINY_SWEEP.replace("base_width: 16", "base_width: 8"))  # an edited file, same name
    with pytest.raises(HptError, match="param.base_width"):
        save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]")
    assert len(ids_of(folder)) == 4


def test_result_files_are_read_defensively(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert read_result(run) == (None, None)
    (run / "result.json").write_text('{"run_id": "r", "status": "compl')
    assert read_result(run)[1].startswith("corrupt result.json")
    (run / "result.json").write_text('{"run_id": "r", "status": "completed"}')
    assert read_result(run)[1] == "partial result.json (missing final_train_loss, final_val_loss)"
    good = {"run_id": "r", "status": "diverged", "final_train_loss": None, "final_val_loss": None}
    (run / "result.json").write_text(json.dumps(good))
    assert read_result(run) == (good, None)


def test_states_from_records_and_processes(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]")
    a, b, c, d = ids_of(folder)
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = {"pid": dead.pid, "start": 1, "host": __import__("socket").gethostname()}
    folder.append_jobs([
        {"event": "queued", "run_id": a, "executor": "local", "scheduler": me},
        {"event": "started", "run_id": b, "executor": "local", "job_id": f"local-{dead.pid}", **me},
        {"event": "ended", "run_id": c, "executor": "local", "job_id": "local-1", "returncode": -9},
    ])
    with open(folder.jobs_file, "a") as f:
        f.write('{"event": "cancelled", "run_id": "')  # a writer killed mid-line
    (folder.run_dir(c) / "logs").mkdir()
    (folder.run_dir(c) / "logs" / "attempt-1.log").write_text("step 1\nstep 2\n")
    states = {s.run_id: s for s in run_states(folder)}
    assert (states[a].state, states[a].active) == ("pending", False)  # its scheduler is gone: launchable
    assert states[b].state == "failed" and "died without a result" in states[b].reason
    assert states[c].state == "failed" and states[c].reason == "killed by SIGKILL without a result"
    assert states[c].log_tail == "step 1\nstep 2" and states[c].attempts == 1
    assert (states[d].state, states[d].reason) == ("pending", "not launched")


def test_array_ids_as_slurm_prints_them():
    assert _expand_ids("12_[0-2,5%2]") == ["12_0", "12_1", "12_2", "12_5"]
    assert _expand_ids("7_3") == ["7_3"] and _expand_ids("8") == ["8"]


def test_collect_has_explicit_types_even_without_results(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]")
    table, problems = collect.collect([folder])
    assert problems == [] and table.num_rows == 4
    out = tmp_path / "r.parquet"
    collect.write(table, out)
    schema = pq.read_schema(out)
    assert schema == collect.SCHEMA  # the same columns and types whatever the sweep holds
    rows = pq.read_table(out).to_pylist()
    assert {r["status"] for r in rows} == {"pending"} and rows[0]["final_val_loss"] is None
    assert {r["width"] for r in rows} == {16, 32} and rows[0]["cfg.train.steps"] == 10
    assert rows[0]["tokens"] == 10 * 4 * 32 and rows[0]["curve_loss"] == []
    assert str(schema.field("cfg.train.tokens").type) == "int64"  # null in every row, still an int column


def test_a_long_runs_table_leads_with_the_runs_that_need_attention():
    states = [RunState(f"run{i}", {"model.width": 16}, "completed") for i in range(150)]
    states += [RunState(f"queued{i}", {"model.width": 16}, "pending") for i in range(120)]
    states.append(RunState("broken", {"model.width": 32}, "failed", "IndexError: out of range"))
    table = views.runs_table(states, ["model.width"])
    assert table.row_count == views.RUN_ROWS and "171 more runs" in table.caption
    assert next(iter(table.columns[0].cells)) == "broken" and "run0" not in table.columns[0].cells
    assert views.runs_table(states[:150], ["model.width"]).row_count == 0  # all finished: the grids say it


def test_curves_in_bulk_equal_reading_each_file(tmp_path):
    """The one-parse curve reader agrees with the line-by-line one on every shape a metrics file takes."""
    files = {
        "done": '{"step": 0, "loss": 5.5}\n{"step": 1, "loss": 4.25}\n{"step": 2, "val_loss": 4.0}\n',
        "diverged": '{"step": 0, "loss": 5.5}\n{"step": 1, "loss": null}\n',
        "running": '{"step": 0, "loss": 5.5}\n{"step": 1, "lo',  # a line being appended
        "empty": "",
        "missing": None,
    }
    dirs = []
    for name, text in files.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "metrics.jsonl").write_text(text)
        dirs.append(str(tmp_path / name))
    step, loss = collect.curves(dirs)
    expected = [collect.curve(Path(d)) for d in dirs]
    assert step.to_pylist() == [s for s, _ in expected] and loss.to_pylist() == [v for _, v in expected]
    assert loss.to_pylist()[:3] == [[5.5, 4.25], [5.5, None], [5.5]]
    # A null validation loss cannot be told from a NaN training loss by columns: read file by file.
    (tmp_path / "done" / "metrics.jsonl").write_text('{"step": 0, "loss": 5.5}\n{"step": 1, "val_loss": null}\n')
    assert collect.curves(dirs[:1])[1].to_pylist() == [[5.5]]


def test_results_index_serves_unchanged_results_and_never_a_replaced_one(tiny, tmp_path):
    folder = SweepFolder(tmp_path / "runs" / "tiny")
    save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]")
    a, b, *_ = ids_of(folder)
    done = {"run_id": a, "status": "completed", "final_train_loss": 2.5, "final_val_loss": 2.6, "steps": 10,
            "flops": 1.0}
    (folder.run_dir(a) / "result.json").write_text(json.dumps(done))
    (folder.run_dir(a) / "logs").mkdir()
    (folder.run_dir(a) / "logs" / "attempt-1.log").write_text("")
    first = {s.run_id: s for s in run_states(folder, summaries=True)}  # no index yet: read, then indexed
    assert first[a].result == {k: done[k] for k in ("run_id", "status", "final_train_loss", "final_val_loss",
                                                    "steps")}
    assert list(folder.result_index()) == [a]
    (folder.run_dir(a) / "logs" / "attempt-1.log").unlink()  # an index hit does not list the logs again
    again = {s.run_id: s for s in run_states(folder, summaries=True)}
    assert again[a].state == "completed" and again[a].attempts == 1 and again[a].final_loss == 2.6
    # The result replaced (by rename, as training writes it): read again, never served stale.
    (folder.run_dir(a) / "new.json").write_text(json.dumps({**done, "status": "diverged", "final_val_loss": None,
                                                             "final_train_loss": 9.9, "steps": 5}))
    (folder.run_dir(a) / "new.json").rename(folder.run_dir(a) / "result.json")
    assert {s.run_id: s for s in run_states(folder, summaries=True)}[a].state == "diverged"
    with open(folder.path / "results.jsonl", "a") as f:
        f.write('{"run_id": "' + b + '", "key": [1, 2')  # a writer killed mid-line: skipped
    states = {s.run_id: s for s in run_states(folder, summaries=True)}
    assert states[a].state == "diverged" and states[b].state == "pending"
    assert "flops" in {s.run_id: s for s in run_states(folder)}[a].result  # without summaries: the whole file


def test_a_finished_job_indexes_its_run(tiny, tmp_path):
    from hptransfer.sweeps.job import execute

    folder = SweepFolder(tmp_path / "runs" / "tiny")
    save(folder, tiny, "optim.lr=0.01", "sweep.seeds=[0]", "train.steps=2", "model.width=16", "param=sp")
    (rid,) = ids_of(folder)
    assert execute(folder.run_dir(rid)) == "completed"
    key, attempts, summary = folder.result_index()[rid]
    assert summary["status"] == "completed" and summary["steps"] == 2 and attempts == 0
    assert key == result_key(folder.run_dir(rid))


def test_rows_to_arrow_keep_types_and_order_whatever_the_values():
    import pyarrow as pa

    from hptransfer.files import arrow_table

    t = arrow_table([{"run_id": "a", "x": 1, "p": "sp"}, {"run_id": "b", "x": 2.5, "p": None}])
    assert t.column_names == ["run_id", "x", "p"] and t.schema.field("x").type == pa.float64()
    assert arrow_table([{"x": float("inf")}]).column("x").to_pylist() == [float("inf")]  # no JSON for inf
    schema = pa.schema([("x", pa.float64()), ("y", pa.string())])
    assert arrow_table([{"x": 5, "z": 1}], schema).to_pylist() == [{"x": 5.0, "y": None}]
    assert arrow_table([], schema).schema == schema
