"""`hpt collect`: one row per run to Parquet, with the columns of docs/design.md#resultsparquet and an
explicit schema.

Finished runs bring their result.json (and their loss curve from metrics.jsonl); runs without a
result appear with their state (pending, running, cancelled, failed) and null metrics. A corrupt
or partial result.json is reported and its run kept as `failed`, never fatal. Column types come
from the schema below and the run config's dataclasses, so a column never changes type between
sweeps, and a sweep that never set a value still has the column (null).
"""

import dataclasses
import io
import json
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from hptransfer.config import user
from hptransfer.config.derived import flatten
from hptransfer.config.schema import RunConfig
from hptransfer.files import arrow_table, write_atomic
from hptransfer.sweeps.state import run_states
from hptransfer.sweeps.store import RunState, SweepFolder, read_metrics

RESULT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()), ("sweep", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("job_id", pa.string()), ("attempts", pa.int64()),
    ("final_train_loss", pa.float64()), ("final_val_loss", pa.float64()), ("initial_loss", pa.float64()),
    ("steps", pa.int64()), ("tokens", pa.int64()), ("batch_size", pa.int64()), ("seq_len", pa.int64()),
    ("n_params", pa.int64()), ("n_params_non_embedding", pa.int64()), ("flops", pa.float64()),
    ("wall_s", pa.float64()), ("tokens_per_s", pa.float64()), ("diverged_at_step", pa.int64()),
    ("clip_fraction", pa.float64()),  # steps with gradient clipping active / steps; null: clipping off or an old run
    ("error", pa.string()),
    # the scaling coordinates
    ("width", pa.int64()), ("depth", pa.int64()), ("parameterization", pa.string()), ("lr", pa.float64()),
    ("seed", pa.int64()),
    # hyperparameters after the batch/duration rules, as training applied them
    ("effective.lr", pa.float64()), ("effective.beta1", pa.float64()), ("effective.beta2", pa.float64()),
    ("effective.eps", pa.float64()), ("effective.weight_decay", pa.float64()),
    ("effective.batch_k", pa.float64()), ("effective.duration_r", pa.float64()),
    ("effective.wd_timescale", pa.float64()),  # AdamW's decay timescale as a fraction of the run (null: no decay)
    # a target run of `hpt predict --launch`: the prediction it tests (its sweep's sweep.yaml); null otherwise
    ("prediction.lr", pa.float64()), ("prediction.lr_low", pa.float64()), ("prediction.lr_high", pa.float64()),
    ("prediction.group", pa.string()), ("prediction.axis", pa.string()), ("prediction.at", pa.float64()),
    ("prediction.from", pa.string()),
    ("env.torch", pa.string()), ("env.device", pa.string()), ("env.hptransfer", pa.string()),
    ("env.host", pa.string()), ("env.git_commit", pa.string()), ("env.git_dirty", pa.bool_()),
    ("env.fused", pa.int64()),  # the size of the fused group the run trained in (null: it trained alone)
]
PREDICTION_COLUMNS = [(n.removeprefix("prediction."), t) for n, t in RESULT_COLUMNS if n.startswith("prediction.")]
CURVE_COLUMNS: list[tuple[str, pa.DataType]] = [("curve_step", pa.list_(pa.int64())),
                                                 ("curve_loss", pa.list_(pa.float64())),
                                                 # the validation curve: every train.eval_every steps, then the final
                                                 ("curve_val_step", pa.list_(pa.int64())),
                                                 ("curve_val_loss", pa.list_(pa.float64()))]
ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def config_columns(cls: type = RunConfig, prefix: str = "cfg.") -> list[tuple[str, pa.DataType]]:
    """`cfg.<dotted.key>` columns typed from the run config's dataclasses (launcher excluded)."""
    return [(prefix + ".".join(path), t) for path, t in _config_leaves(cls)]


def _config_leaves(cls: type) -> list[tuple[tuple[str, ...], pa.DataType]]:
    hints = typing.get_type_hints(cls)
    out: list[tuple[tuple[str, ...], pa.DataType]] = []
    for f in dataclasses.fields(cls):
        if f.name == "launcher":
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None`: nullable int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if dataclasses.is_dataclass(kind):
            out += [((f.name, *path), t) for path, t in _config_leaves(kind)]
        elif typing.get_origin(kind) is dict:  # per-class constants: one column per default key
            value_type = ARROW_TYPES[typing.get_args(kind)[1]]
            out += [((f.name, k), value_type) for k in f.default_factory()]
        else:
            out.append(((f.name,), ARROW_TYPES[kind]))
    return out


def _struct_of(leaves: list[tuple[tuple[str, ...], pa.DataType]]) -> list[pa.Field]:
    """The nested struct fields a config's JSON parses into (what `Table.flatten` turns back into leaves)."""
    children: dict[str, list[tuple[tuple[str, ...], pa.DataType]]] = {}
    fields: list[pa.Field] = []
    for path, t in leaves:
        if len(path) == 1:
            fields.append(pa.field(path[0], t))
        else:
            if path[0] not in children:
                children[path[0]] = []
                fields.append(pa.field(path[0], pa.null()))  # placeholder, keeps the order
            children[path[0]].append((path[1:], t))
    return [pa.field(f.name, pa.struct(_struct_of(children[f.name]))) if f.name in children else f for f in fields]


CONFIG_COLUMNS = config_columns()
CONFIG_STRUCT = pa.schema(_struct_of(_config_leaves(RunConfig)))
SCHEMA = pa.schema(RESULT_COLUMNS + CONFIG_COLUMNS + CURVE_COLUMNS)
CURVE_LINE = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("val_loss", pa.float64())])


def curve(run_dir: Path, key: str = "loss") -> tuple[list[int], list[float | None]]:
    """The training loss per step from metrics.jsonl (a line being appended is not read yet; a file with a
    bad line has no curve: store.read_metrics); key="val_loss": the validation loss at each evaluation."""
    return _points(read_metrics(run_dir)[0], key)


def _points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float | None]]:
    """(steps, values) of the records that hold `key`."""
    kept = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in kept], [v for _, v in kept]


def curves(run_dirs: list[str]) -> tuple[pa.Array, pa.Array]:
    """Every run's training loss curve as two list columns (`all_curves`' first two)."""
    return all_curves(run_dirs)[:2]


def all_curves(run_dirs: list[str], problems: list[str] | None = None
               ) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """Every run's training and validation curves as four list columns (step, loss, val step, val loss),
    parsed in one go by Arrow's JSON reader.

    Each file is cut after its last newline (a line being appended is not yet part of the curve);
    a validation line ({step, val_loss}) is no training step, it goes to the validation curve. Should
    the bulk parse fail (a line torn inside a file), or a file hold a line the columns cannot tell apart
    (a null val_loss), the files are read one by one with `curve`, and a file with a bad line (not UTF-8,
    not an object, a value of the wrong type) is named in `problems`, its curves skipped.
    """
    blobs = []
    for d in run_dirs:
        try:
            with open(f"{d}/metrics.jsonl", "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        blobs.append(data[: data.rfind(b"\n") + 1])
    counts = np.array([b.count(b"\n") for b in blobs], dtype=np.int64)
    try:
        if any(b'"val_loss": null' in b for b in blobs):
            raise ValueError("a null validation loss")
        options = pa_json.ParseOptions(explicit_schema=CURVE_LINE, unexpected_field_behavior="ignore")
        lines = pa_json.read_json(io.BytesIO(b"".join(blobs)), parse_options=options) if counts.sum() \
            else CURVE_LINE.empty_table()
        if lines.num_rows != counts.sum():  # a blank line, or two objects on one: rows would shift between runs
            raise ValueError("lines and rows differ")
    except (pa.ArrowInvalid, ValueError):  # file by file, each read once
        read = [read_metrics(d) for d in run_dirs]
        if problems is not None:
            problems += [f"{Path(d).parent.name}/{Path(d).name}: {why}: curve skipped"
                         for d, (_, why) in zip(run_dirs, read, strict=True) if why]
        out = []
        for key in ("loss", "val_loss"):
            points = [_points(records, key) for records, _ in read]
            out += [pa.array([s for s, _ in points], pa.list_(pa.int64())),
                    pa.array([v for _, v in points], pa.list_(pa.float64()))]
        return tuple(out)
    # numpy <-> Arrow through raw buffers: Arrow's conversions of numpy or Python values import pandas.
    mask = pc.is_null(lines.column("val_loss")).combine_chunks()
    bits = np.unpackbits(np.frombuffer(mask.buffers()[1], np.uint8), bitorder="little")
    keep = bits[mask.offset:mask.offset + len(mask)].astype(bool)
    run_of_line = np.repeat(np.arange(len(run_dirs)), counts)
    kept = np.bincount(run_of_line[keep], minlength=len(run_dirs))
    step, loss, val = (lines.column(c).combine_chunks() for c in ("step", "loss", "val_loss"))
    out = []
    for n, rows, value in ((kept, mask, loss), (counts - kept, pc.invert(mask), val)):  # training, then validation
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        offsets = pa.Array.from_buffers(pa.int32(), len(offsets), [None, pa.py_buffer(offsets.tobytes())])
        out += [pa.ListArray.from_arrays(offsets, step.filter(rows)),
                pa.ListArray.from_arrays(offsets, value.filter(rows))]
    return tuple(out)


def config_table(config_json: list[str]) -> pa.Table:
    """The `cfg.*` columns from the manifest's config JSON, parsed in one go, typed by the schema."""
    if not config_json:
        return pa.schema(CONFIG_COLUMNS).empty_table()
    data = "\n".join(config_json).encode() + b"\n"
    table = pa_json.read_json(io.BytesIO(data), parse_options=pa_json.ParseOptions(
        explicit_schema=CONFIG_STRUCT, unexpected_field_behavior="ignore"))
    while any(pa.types.is_struct(f.type) for f in table.schema):
        table = table.flatten()
    return table.rename_columns(["cfg." + n for n in table.column_names]).select([n for n, _ in CONFIG_COLUMNS])


def result_row(folder: SweepFolder, s: RunState) -> dict[str, Any]:
    """A run's result fields when finished, else its state (its config and curve are columns of their own)."""
    r = s.result or {}
    eff = r.get("effective") or {}
    out: dict[str, Any] = {
        **{k: r.get(k) for k, _ in RESULT_COLUMNS},
        "run_id": s.run_id, "sweep": folder.name, "status": s.state, "reason": s.reason or None,
        "job_id": s.job_id, "attempts": s.attempts,
        **{f"effective.{k}": eff.get(k) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
        "effective.batch_k": (eff.get("batch_rule") or {}).get("k"),
        "effective.duration_r": (eff.get("duration_rule") or {}).get("r"),
        "effective.wd_timescale": (eff.get("wd_timescale") or {}).get("fraction"),
        **{f"env.{k}": (r.get("env") or {}).get(k) for k in ("torch", "device", "hptransfer", "host",
                                                              "git_commit", "git_dirty", "fused")},
    }
    if s.state == "failed" and not out["error"]:
        out["error"] = s.reason or None
    return out


def sweep_table(folder: SweepFolder) -> tuple[pa.Table, list[str]]:
    """One sweep's rows, and the problems found (corrupt result files)."""
    configs = {r["run_id"]: r["config"] for r in folder.manifest()}
    states = run_states(folder)
    problems = [f"{folder.name}/{s.run_id}: {s.reason}: skipped" for s in states
                if s.result is None and s.reason.startswith(("corrupt", "partial", "unreadable"))]
    results = arrow_table([result_row(folder, s) for s in states], pa.schema(RESULT_COLUMNS))
    frozen = [configs[s.run_id] for s in states]
    if frozen and '"run":' in frozen[0] and user.is_user_config(json.loads(frozen[0])):
        cfg, coords = _user_columns(folder, [json.loads(c) for c in frozen], results)
    else:
        cfg = config_table(frozen)
        # The scaling coordinates and the planned tokens (a run without a result) come from the config.
        planned = pc.multiply(pc.multiply(cfg["cfg.train.steps"], cfg["cfg.train.batch_size"]),
                              cfg["cfg.train.seq_len"])
        coords = {"tokens": pc.coalesce(results["tokens"], planned), "batch_size": cfg["cfg.train.batch_size"],
                  "seq_len": cfg["cfg.train.seq_len"], "width": cfg["cfg.model.width"],
                  "depth": cfg["cfg.model.n_layers"], "parameterization": cfg["cfg.param.name"],
                  "lr": cfg["cfg.optim.lr"], "seed": cfg["cfg.train.seed"]}
    prediction = ((folder.definition() or {}).get("sweep") or {}).get("prediction") or {}
    for key, kind in PREDICTION_COLUMNS:
        if prediction.get(key) is not None:
            coords[f"prediction.{key}"] = pa.array([prediction[key]] * len(states), kind)
    for name, column in coords.items():
        results = results.set_column(results.schema.get_field_index(name), name, column)
    curve_columns = all_curves([f"{folder.path}/{s.run_id}" for s in states], problems)
    columns = [*results.columns, *cfg.columns, *curve_columns]
    schema = SCHEMA if cfg.schema.names == [n for n, _ in CONFIG_COLUMNS] else pa.schema(
        RESULT_COLUMNS + list(zip(cfg.schema.names, cfg.schema.types, strict=True)) + CURVE_COLUMNS)
    return pa.Table.from_arrays(columns, schema=schema), problems


def _user_columns(folder: SweepFolder, frozen: list[dict[str, Any]], results: pa.Table
                  ) -> tuple[pa.Table, dict[str, pa.Array]]:
    """A sweep of the user's code: `cfg.*` from their keys (types as their values have them) and what runs,
    and the scaling coordinates from the keys `run.columns` names (the sweep's name stands for a
    parameterization no key names)."""
    rows = [flatten({**user.user_keys(c), "run": {k: c["run"][k] for k in ("target", "command")}}) for c in frozen]
    names = list(dict.fromkeys(k for r in rows for k in r))
    cfg = pa.table({f"cfg.{k}": pa.array([r.get(k) for r in rows]) for k in names})
    columns = frozen[0]["run"]["columns"]

    def column(name: str, kind: pa.DataType) -> pa.Array:
        key = columns.get(name)
        values = [user.get(c, key) if key and user.has(c, key) else None for c in frozen]
        return pa.array(values).cast(kind) if key else pa.nulls(len(frozen), kind)

    coords = {name: column(name, kind) for name, kind in RESULT_COLUMNS if name in user.COLUMNS and name != "tokens"}
    coords["tokens"] = pc.coalesce(results["tokens"], column("tokens", pa.int64()))
    if "parameterization" not in columns:
        coords["parameterization"] = pa.array([folder.name] * len(frozen), pa.string())
    return cfg, coords


def collect(folders: list[SweepFolder]) -> tuple[pa.Table, list[str]]:
    """All runs of these sweeps as one table, and the problems found (corrupt result files)."""
    tables, problems = [], []
    for folder in folders:
        table, found = sweep_table(folder)
        tables.append(table)
        problems += found
    # Sweeps of the user's code bring their own cfg.* columns: the union of all, null where a sweep has none.
    return (pa.concat_tables(tables, promote_options="permissive") if tables else SCHEMA.empty_table()), problems


def write(table: pa.Table, out: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(out, buf.getvalue())
