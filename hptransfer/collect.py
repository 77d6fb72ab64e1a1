"""`hpt collect`: one row per run to Parquet, with DESIGN.md's columns and an explicit schema.

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
from contextlib import suppress
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hptransfer.config import RunConfig
from hptransfer.io import write_atomic
from hptransfer.status import RunState, run_states
from hptransfer.store import SweepFolder, flatten

RESULT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()), ("sweep", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("job_id", pa.string()), ("attempts", pa.int64()),
    ("final_train_loss", pa.float64()), ("final_val_loss", pa.float64()), ("initial_loss", pa.float64()),
    ("steps", pa.int64()), ("tokens", pa.int64()), ("batch_size", pa.int64()), ("seq_len", pa.int64()),
    ("n_params", pa.int64()), ("n_params_non_embedding", pa.int64()), ("flops", pa.float64()),
    ("wall_s", pa.float64()), ("tokens_per_s", pa.float64()), ("diverged_at_step", pa.int64()),
    ("error", pa.string()),
    # the scaling coordinates
    ("width", pa.int64()), ("depth", pa.int64()), ("parameterization", pa.string()), ("lr", pa.float64()),
    # hyperparameters after the batch/duration rules, as training applied them
    ("effective.lr", pa.float64()), ("effective.beta1", pa.float64()), ("effective.beta2", pa.float64()),
    ("effective.eps", pa.float64()), ("effective.weight_decay", pa.float64()),
    ("effective.batch_k", pa.float64()), ("effective.duration_r", pa.float64()),
    ("env.torch", pa.string()), ("env.device", pa.string()), ("env.hptransfer", pa.string()),
    ("env.host", pa.string()), ("env.git_commit", pa.string()), ("env.git_dirty", pa.bool_()),
]
CURVE_COLUMNS: list[tuple[str, pa.DataType]] = [("curve_step", pa.list_(pa.int64())),
                                                 ("curve_loss", pa.list_(pa.float64()))]
ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def config_columns(cls: type = RunConfig, prefix: str = "cfg.") -> list[tuple[str, pa.DataType]]:
    """`cfg.<dotted.key>` columns typed from the run config's dataclasses (launcher excluded)."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, pa.DataType]] = []
    for f in dataclasses.fields(cls):
        if f.name == "launcher":
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None`: nullable int
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if dataclasses.is_dataclass(kind):
            out += config_columns(kind, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is dict:  # per-class constants: one column per default key
            value_type = ARROW_TYPES[typing.get_args(kind)[1]]
            out += [(f"{prefix}{f.name}.{k}", value_type) for k in f.default_factory()]
        else:
            out.append((f"{prefix}{f.name}", ARROW_TYPES[kind]))
    return out


SCHEMA = pa.schema(RESULT_COLUMNS + config_columns() + CURVE_COLUMNS)


def curve(run_dir: Path) -> tuple[list[int], list[float | None]]:
    """The training loss per step from metrics.jsonl (a torn last line is skipped)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text().strip()
    except OSError:
        return [], []
    try:  # one parse for the whole file; line by line only when a line is torn
        records = json.loads("[" + text.replace("\n", ",") + "]")
    except json.JSONDecodeError:
        records = []
        for line in text.splitlines():
            with suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    curve = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return [s for s, _ in curve], [v for _, v in curve]


def row(folder: SweepFolder, s: RunState, config: dict[str, Any]) -> dict[str, Any]:
    """One run's row: result fields when finished, else its state; config, coordinates and curve always."""
    t = config["train"]
    planned_tokens = t["steps"] * t["batch_size"] * t["seq_len"]
    r = s.result or {}
    eff = r.get("effective") or {}
    out: dict[str, Any] = {
        **{k: r.get(k) for k, _ in RESULT_COLUMNS},
        "run_id": s.run_id, "sweep": folder.name, "status": s.state, "reason": s.reason or None,
        "job_id": s.job_id, "attempts": s.attempts,
        "tokens": r.get("tokens", planned_tokens), "batch_size": t["batch_size"], "seq_len": t["seq_len"],
        "width": config["model"]["width"], "depth": config["model"]["n_layers"],
        "parameterization": config["param"]["name"], "lr": config["optim"]["lr"],
        **{f"effective.{k}": eff.get(k) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
        "effective.batch_k": (eff.get("batch_rule") or {}).get("k"),
        "effective.duration_r": (eff.get("duration_rule") or {}).get("r"),
        **{f"env.{k}": (r.get("env") or {}).get(k) for k in ("torch", "device", "hptransfer", "host",
                                                              "git_commit", "git_dirty")},
        **flatten(config, "cfg."),
    }
    if s.state == "failed" and not out["error"]:
        out["error"] = s.reason or None
    out["curve_step"], out["curve_loss"] = curve(folder.run_dir(s.run_id))
    return out


def collect(folders: list[SweepFolder]) -> tuple[pa.Table, list[str]]:
    """All runs of these sweeps as one table, and the problems found (corrupt result files)."""
    rows, problems = [], []
    for folder in folders:
        configs = {r["run_id"]: r["config"] for r in folder.manifest()}
        for s in run_states(folder):
            if s.result is None and s.reason.startswith(("corrupt", "partial")):
                problems.append(f"{folder.name}/{s.run_id}: {s.reason}: skipped")
            rows.append(row(folder, s, json.loads(configs[s.run_id])))
    names = set(SCHEMA.names)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k in names} for r in rows], schema=SCHEMA)
    return table, problems


def write(table: pa.Table, out: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(out, buf.getvalue())
