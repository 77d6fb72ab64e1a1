"""The sweep folder (docs/design.md#the-sweep-folder), and what each run folder says about its run.

    <root>/<sweep>/
      sweep.yaml          the composed sweep as last launched (dimensions after command-line overrides)
      manifest.parquet    one row per run: run_id, the swept values, the run config as JSON
      jobs.jsonl          append-only job records (queued, started, submitted, ended, cancelled)
      results.jsonl       append-only index of finished runs (derived: what `hpt status` reads first)
      .lock               flock'd while a process decides what to launch
      <run_id>/config.yaml, result.json, metrics.jsonl, heartbeat.json, checkpoint.pt, logs/

Runs are only ever added to a sweep: a definition that differs in anything but the swept values is
refused, and a run's config.yaml, once written, is never rewritten. Every write is atomic, every
append starts on a fresh line. The manifest and the results index are derived: a missing or
unreadable manifest is rebuilt from the run folders' config.yaml and sweep.yaml's swept keys.
"""

import fcntl
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from hptransfer.config.derived import SEED_KEY, flatten
from hptransfer.errors import HptError
from hptransfer.files import append_lines, arrow_table, json_lines, write_atomic, write_many_atomic

if TYPE_CHECKING:  # `hpt status` reads folders without importing Hydra (the plan) at all
    from hptransfer.sweeps.plan import Run, SweepSpec

ATTEMPT_LOG = re.compile(r"attempt-(\d+)(?:\.rank(\d+))?\.(log|out|err)$")  # attempt, rank (> 0), kind
RESULTS_INDEX = "results.jsonl"  # the index of finished runs, so `hpt status` need not read 10,000 files
INDEX_FIELDS = frozenset({"run_id", "key", "attempts", "result"})
SUMMARY_KEYS = ("run_id", "status", "final_train_loss", "final_val_loss", "steps")  # what `hpt status` shows
STATES = ("pending", "running", "completed", "diverged", "failed", "cancelled")
RUN_ID = re.compile(r"[0-9a-f]{12}$")  # a run folder's name
_HELD: dict[str, int] = {}  # sweep folders whose lock this process holds (the lock is re-entrant)


def warn(message: str) -> None:
    """One warning line on stderr (the command's output, on stdout, stays clean: `hpt status --json`)."""
    print(f"hpt: warning: {message}", file=sys.stderr, flush=True)


@dataclass
class RunState:
    """What is known of one run: its state (one of STATES) and why, its job, its result (once finished)."""

    run_id: str
    point: dict[str, Any]
    state: str
    reason: str = ""
    active: bool = False  # a live job (queued or running) holds the run: it must not be launched again
    job_id: str | None = None
    executor: str | None = None
    attempts: int = 0
    step: int | None = None
    result: dict[str, Any] | None = None
    log_tail: str | None = None

    @property
    def final_loss(self) -> float | None:
        return None if self.result is None else self.result.get("final_val_loss")

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, **self.point, "state": self.state, "reason": self.reason,
                "job_id": self.job_id, "executor": self.executor, "attempts": self.attempts, "step": self.step,
                "final_val_loss": self.final_loss,
                "final_train_loss": None if self.result is None else self.result.get("final_train_loss"),
                "log_tail": self.log_tail}


def root_dir(root: Path | None = None) -> Path:
    """Where sweeps live: --root, else $HPT_ROOT, else ./runs."""
    return Path(root or os.environ.get("HPT_ROOT") or "runs")


@dataclass(frozen=True)
class SweepFolder:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def jobs_file(self) -> Path:
        return self.path / "jobs.jsonl"

    def run_dir(self, run_id: str) -> Path:
        return self.path / run_id

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive while held: one process at a time decides what to launch in this sweep.

        Re-entrant within a process (a manifest repaired while `save` holds the lock takes it again).
        """
        key = os.path.abspath(self.path)
        if _HELD.get(key):
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _HELD[key] = 1
            try:
                yield
            finally:
                _HELD.pop(key, None)
                fcntl.flock(f, fcntl.LOCK_UN)

    def definition(self) -> dict[str, Any] | None:
        """The sweep.yaml as written, or None for a new sweep; an HptError naming the file when it is corrupt."""
        from omegaconf import OmegaConf  # here, not above: `hpt status` needs no OmegaConf

        f = self.path / "sweep.yaml"
        if not f.exists():
            return None
        try:
            d = OmegaConf.to_container(OmegaConf.load(f))
            ok = isinstance(d, dict) and isinstance(d.get("sweep"), dict) and isinstance(d["sweep"].get("axis"), dict)
            why = "" if ok else "no sweep block with an axis"
        except Exception as err:  # YAML syntax, undecodable bytes, interpolation errors: all say the same
            d, why = None, next(iter(str(err).strip().splitlines()), type(err).__name__)
        if why:
            raise HptError(f"{f} is corrupt ({why}): it only records the sweep as last launched, so delete it "
                           f"and run the same hpt sweep again to rewrite it (runs and results are kept)")
        return d

    def manifest(self, *, configs: bool = True, swept: list[str] | None = None) -> list[dict[str, Any]]:
        """One row per run, in order: run_id, the swept values and (unless `configs=False`) the config as JSON.

        A missing or unreadable manifest with run folders beside it is rebuilt from them (`swept`: the
        swept keys, else sweep.yaml's), written back, and said in one warning.
        """
        try:
            return self._read_manifest(configs)
        except FileNotFoundError:
            why = "was missing"
        except (OSError, ValueError, pa.ArrowException) as err:
            why = f"was unreadable ({next(iter(str(err).splitlines()), type(err).__name__)})"
        rows = self._repair_manifest(why, swept)
        return rows if configs else [{k: v for k, v in r.items() if k != "config"} for r in rows]

    def _read_manifest(self, configs: bool) -> list[dict[str, Any]]:
        manifest = pq.ParquetFile(f"{self.path}/manifest.parquet")  # not pq.read_table: that imports pandas
        names = manifest.schema_arrow.names
        if "run_id" not in names or (configs and "config" not in names):
            raise ValueError("no run_id or config column")
        columns = None if configs else [c for c in names if c != "config"]
        return manifest.read(columns=columns).to_pylist()

    def run_folders(self) -> list[str]:
        """The ids of the run folders that hold a config.yaml."""
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return []
        return sorted(e.name for e in entries if RUN_ID.match(e.name) and os.path.exists(f"{e.path}/config.yaml"))

    def _repair_manifest(self, why: str, swept: list[str] | None) -> list[dict[str, Any]]:
        """The manifest rebuilt from the run folders, written back atomically (under the lock, so a
        concurrent `save` is never overwritten); [] when there is nothing to rebuild from."""
        if not self.run_folders():
            return []  # a new sweep, or one whose first write failed: nothing was lost
        try:
            with self.lock():
                try:
                    return self._read_manifest(True)  # repaired (or written by `save`) while we waited
                except (OSError, ValueError, pa.ArrowException):
                    pass
                rows, skipped = self._rebuild_rows(swept)
                written = self._write_manifest(rows)
        except OSError:  # a sweep folder this user may only read: rebuild, keep it to ourselves
            (rows, skipped), written = self._rebuild_rows(swept), False
        note = "" if written else "; could not write it back"
        note += f"; {len(skipped)} folders skipped (unreadable or foreign config.yaml: {skipped[0]})" if skipped else ""
        warn(f"sweep '{self.name}': manifest.parquet {why}: rebuilt it from {len(rows)} run folders{note}")
        return rows

    def _write_manifest(self, rows: list[dict[str, Any]]) -> bool:
        buf = io.BytesIO()
        pq.write_table(arrow_table(rows), buf)
        try:
            write_atomic(self.path / "manifest.parquet", buf.getvalue())
        except OSError:  # a full disk or a read-only folder: the rows stand for this command
            return False
        return True

    def _rebuild_rows(self, swept: list[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Manifest rows from each run folder's config.yaml: its id, the swept values, the config JSON.

        The swept keys are `swept`, else sweep.yaml's (axis, grid, seeds), else the keys whose values
        differ between runs; rows come in the plan's order of those values.
        """
        # here: only a repair reads YAML (`hpt status` never imports OmegaConf)
        import yaml
        from omegaconf import OmegaConf

        from hptransfer.config.frozen import canonical_json, id_of, identity_json  # likewise

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        configs, skipped = {}, []
        for rid in self.run_folders():
            path = self.path / rid / "config.yaml"
            try:  # PyYAML's C loader (~1 ms a file); OmegaConf's (~15 ms) where YAML 1.1 reads a value otherwise
                cfg = yaml.load(path.read_bytes(), Loader=loader)
                if not isinstance(cfg, dict) or id_of(identity_json(cfg)) != rid:
                    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
                if not isinstance(cfg, dict) or id_of(identity_json(cfg)) != rid:
                    raise ValueError("not this run's config")
            except Exception:  # any unreadable config: the folder is skipped and counted
                skipped.append(rid)
                continue
            configs[rid] = cfg
        order: dict[str, list[Any]] = {}  # each swept key's values in sweep.yaml's order: the plan's order
        with suppress(HptError, KeyError, TypeError, AttributeError):
            s = (self.definition() or {})["sweep"]
            grid = s.get("grid") or {}
            seed_key = s.get("seed_key", SEED_KEY)
            order = {s["axis"]["key"]: list(s["axis"].get("values") or []),
                     **{k: list(v) for k, v in grid.items() if isinstance(v, list)},
                     seed_key: list(s.get("seeds") or [])}
            swept = swept or [s["axis"]["key"], *grid, seed_key]
        flat = {rid: flatten(cfg) for rid, cfg in configs.items()}
        if swept is None:  # no sweep.yaml either: the keys that vary
            values: dict[str, set] = {}
            for f in flat.values():
                for k, v in f.items():
                    values.setdefault(k, set()).add(json.dumps(v))
            swept = [k for k, v in values.items() if len(v) > 1] or [SEED_KEY]

        def value(rid: str, key: str) -> Any:
            section = configs[rid].get(key)
            return section.get("name") if isinstance(section, dict) else flat[rid].get(key)  # a group: its name

        rows = [{"run_id": rid, **{k: value(rid, k) for k in swept}, "config": canonical_json(configs[rid])}
                for rid in configs]

        def rank(row: dict[str, Any]) -> tuple:
            out = []
            for k in swept:
                known = order.get(k, [])
                out += [known.index(row[k]) if row[k] in known else len(known), str(row[k])]
            return tuple(out)

        return sorted(rows, key=rank), skipped

    def append_jobs(self, records: list[dict[str, Any]]) -> None:
        """Append job records in one write, on a fresh line, all or none (files.append_lines)."""
        if records:
            append_lines(self.jobs_file, "".join(json.dumps(r, default=str) + "\n" for r in records))

    def job_records(self) -> list[dict[str, Any]]:
        """Every job record, oldest first; a torn line (a writer killed mid-write) or a foreign one is skipped."""
        return [r for r in json_lines(self.jobs_file)
                if isinstance(r, dict) and isinstance(r.get("run_id"), str) and isinstance(r.get("event"), str)]

    def result_index(self) -> dict[str, list[Any]]:
        """Finished runs by id: [their result.json's key, attempts, result summary], the latest line of each.

        results.jsonl is appended by each job as it finishes and by `hpt status` for results it had
        to read. It is derived and disposable: a torn or foreign line is skipped, and an entry whose
        key no longer matches its result.json (a result replaced) is read again from the file.
        """
        return {r["run_id"]: [r["key"], r["attempts"], r["result"]] for r in json_lines(self.path / RESULTS_INDEX)
                if isinstance(r, dict) and r.keys() >= INDEX_FIELDS and isinstance(r["result"], dict)
                and r["result"].get("status") in ("completed", "diverged")}

    def index_results(self, entries: list[dict[str, Any]]) -> None:
        """Append index entries in one write; a folder this process may not write (or a full disk) is fine."""
        if entries:
            with suppress(OSError):
                append_lines(self.path / RESULTS_INDEX, "".join(json.dumps(e) + "\n" for e in entries))

    def same_definition(self, spec: "SweepSpec") -> dict[str, Any]:
        """The sweep's definition; an HptError naming the difference if this name holds a different one."""
        new = sweep_definition(spec)
        old = self.definition()
        if old is not None:
            _check_same_definition(self.name, definition_key(old), definition_key(new))
        return new

    def save(self, spec: "SweepSpec", runs: "list[Run]", *, header: str) -> int:
        """Write sweep.yaml, the manifest (old rows kept) and new runs' config.yaml; returns how many are new.

        Call under `lock()`. A sweep of this name defined differently is an HptError naming the difference.
        """
        from omegaconf import OmegaConf  # here, not above: `hpt status` needs no OmegaConf

        from hptransfer.config.frozen import to_yaml  # likewise

        new_def = self.same_definition(spec)
        old_rows = self.manifest(swept=[d.key for d in spec.dims])  # rebuilt (and written back) if lost
        known = {r["run_id"] for r in old_rows}
        rows, configs = [], {}
        for r in runs:
            if r.run_id in known:  # its config.yaml is frozen: never rewritten, jobs read only this
                continue
            rows.append({"run_id": r.run_id, **r.point, "config": r.config_json})
            path = Path(f"{self.path}/{r.run_id}/config.yaml")
            if not os.path.exists(path):
                configs[path] = header + to_yaml(r.config)
        # The configs before the manifest: a run the manifest lists always has its config.yaml.
        write_many_atomic(configs)
        write_atomic(self.path / "sweep.yaml", OmegaConf.to_yaml(OmegaConf.create(new_def)))
        if rows:
            buf = io.BytesIO()
            pq.write_table(arrow_table(old_rows + rows), buf)
            write_atomic(self.path / "manifest.parquet", buf.getvalue())
        return len(rows)


def sweep_definition(spec: "SweepSpec") -> dict[str, Any]:
    """The composed sweep as launched: the file's config with its dimensions as the command line left them."""
    from omegaconf import OmegaConf  # here, not above: `hpt status` needs no OmegaConf

    cfg = OmegaConf.to_container(spec.composed, resolve=True)
    axis, *grid, seeds = spec.dims
    cfg["sweep"] = {
        **cfg.get("sweep", {}),
        "name": spec.name,
        "file": str(spec.file),
        "overrides": spec.overrides,
        "axis": {"key": axis.key, "values": list(axis.values)},
        "grid": {d.key: list(d.values) for d in grid},
        "seeds": list(seeds.values),
        **({"seed_key": spec.seed_key} if spec.seed_key != SEED_KEY else {}),
    }
    return cfg


def definition_key(definition: dict[str, Any]) -> dict[str, Any]:
    """What must not change under a sweep's name: everything but the swept values, name, file and launcher.

    The swept keys themselves stay (adding a dimension changes every point), their values go; a swept
    config group keeps its subtree (the file's settings under it still matter). Keys added to the run
    config since the sweep was defined count only when set away from their defaults.
    """
    from hptransfer.config.frozen import without_later_defaults  # here: `hpt status` needs no OmegaConf

    d = without_later_defaults(json.loads(json.dumps(definition)))
    s = d.pop("sweep")
    d.pop("launcher", None)
    swept = [s["axis"]["key"], *s["grid"], s.get("seed_key", SEED_KEY)]
    for key in swept:
        *path, leaf = key.split(".")
        node = d
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if path and isinstance(node, dict):
            node.pop(leaf, None)
    return {"config": flatten(d), "axis": s["axis"]["key"], "grid": sorted(s["grid"])}


def _check_same_definition(name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    if old == new:
        return
    if old["axis"] != new["axis"] or old["grid"] != new["grid"]:
        diff = f"swept keys {[old['axis'], *old['grid']]} -> {[new['axis'], *new['grid']]}"
    else:
        keys = sorted(set(old["config"]) | set(new["config"]))
        changed = [k for k in keys if old["config"].get(k) != new["config"].get(k)]
        diff = ", ".join(f"{k}: {old['config'].get(k)!r} -> {new['config'].get(k)!r}" for k in changed[:4])
        diff += f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
    raise HptError(f"sweep '{name}' exists with a different definition ({diff}); only added points are "
                   f"allowed under one name: pass --name to start a new sweep")


def list_sweeps(root: Path) -> list[SweepFolder]:
    return sorted((SweepFolder(p.parent) for p in root.glob("*/sweep.yaml")), key=lambda s: s.name)


def open_sweep(name: str, root: Path) -> SweepFolder:
    """A sweep by name under root, or by its folder's path."""
    for path in (root / name, Path(name)):
        if (path / "sweep.yaml").exists():
            return SweepFolder(path)
    known = ", ".join(s.name for s in list_sweeps(root)) or "none"
    raise HptError(f"no sweep '{name}' in {root} (sweeps there: {known})")


# ---- what a run folder says -------------------------------------------------------------------------


RESULT_REQUIRED = ("run_id", "status", "final_train_loss", "final_val_loss")
# The typed fields of result.json that readers use (docs/design.md#resultjson); a value of another type
# makes the file corrupt (its run `failed`), never a crash in `hpt status` or `hpt collect`.
_NUMBER, _INTEGER, _TEXT, _OBJECT, _BOOL = "a number", "an integer", "a string", "an object", "true or false"
RESULT_TYPES = {
    **dict.fromkeys(("final_train_loss", "final_val_loss", "initial_loss", "flops", "wall_s", "tokens_per_s",
                     "clip_fraction"), _NUMBER),
    **dict.fromkeys(("steps", "tokens", "batch_size", "seq_len", "n_params", "n_params_non_embedding",
                     "diverged_at_step"), _INTEGER),
    **dict.fromkeys(("run_id", "sweep", "error", "flops_formula"), _TEXT),
    "effective": _OBJECT, "env": _OBJECT,
    **{f"effective.{k}": _NUMBER for k in ("lr", "beta1", "beta2", "eps", "weight_decay")},
    **{f"effective.{k}": _OBJECT for k in ("batch_rule", "duration_rule", "wd_timescale")},
    "effective.batch_rule.k": _NUMBER, "effective.duration_rule.r": _NUMBER, "effective.wd_timescale.fraction": _NUMBER,
    **{f"env.{k}": _TEXT for k in ("torch", "device", "hptransfer", "host", "git_commit")}, "env.git_dirty": _BOOL,
}
_IS = {_NUMBER: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
       _INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool), _TEXT: lambda v: isinstance(v, str),
       _OBJECT: lambda v: isinstance(v, dict), _BOOL: lambda v: isinstance(v, bool)}


def result_type_problem(result: dict[str, Any]) -> str | None:
    """The first field of a result record whose value has the wrong type ("steps is not an integer"), or None."""
    for key, kind in RESULT_TYPES.items():
        node: Any = result
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not _IS[kind](node):
            return f"{key} is not {kind}"
    return None


def read_result(run_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None), (None, None) when there is none yet, or (None, why) for a corrupt or partial file."""
    try:
        with open(f"{run_dir}/result.json", "rb") as f:  # a str path: status reads thousands of these
            text = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"unreadable result.json ({err.strerror or err})"
    try:
        result = json.loads(text.decode())  # decoded first: json.loads would take bytes with a BOM for UTF-16
    except UnicodeDecodeError:
        return None, "corrupt result.json (not UTF-8 text)"
    except json.JSONDecodeError as err:
        return None, f"corrupt result.json ({err.msg} at line {err.lineno})"
    if not isinstance(result, dict) or any(k not in result for k in RESULT_REQUIRED):
        missing = [k for k in RESULT_REQUIRED if not isinstance(result, dict) or k not in result]
        return None, f"partial result.json (missing {', '.join(missing)})"
    if result["status"] not in ("completed", "diverged", "failed"):
        return None, f"corrupt result.json (unknown status {result['status']!r})"
    wrong = result_type_problem(result)
    if wrong:
        return None, f"corrupt result.json: {wrong}"
    return result, None


def result_key(run_dir: Path | str) -> list[int] | None:
    """What identifies one result.json: a new file (written once, by rename) has a new inode and mtime."""
    try:
        st = os.stat(f"{run_dir}/result.json")
    except OSError:
        return None
    return [st.st_ino, st.st_mtime_ns, st.st_size]


def index_entry(key: list[int] | None, result: dict[str, Any], attempts: int) -> dict[str, Any] | None:
    """A finished run's line of results.jsonl; None for a failed one (read again each time: its error
    is the reason and the log tail status shows) or a result.json gone.

    `key` is `result_key` taken *before* `result` was read: a file replaced after that has another
    key, so the entry is a miss next time, never a stale hit.
    """
    if key is None or result.get("status") not in ("completed", "diverged"):
        return None
    return {"run_id": result["run_id"], "key": key, "attempts": attempts,
            "result": {k: result.get(k) for k in SUMMARY_KEYS}}


def set_aside_result(run_dir: Path) -> None:
    """Keep a failed (or corrupt) result as logs/result-<time>.json so the run can be trained again."""
    f = run_dir / "result.json"
    if f.exists():
        (run_dir / "logs").mkdir(exist_ok=True)
        os.replace(f, run_dir / "logs" / f"result-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.json")


def attempt_log(attempt: int, suffix: str, rank: int = 0) -> str:
    """The name of an attempt's log: attempt-N.out, or attempt-N.rank<r>.out for rank r > 0 of a multi-task job."""
    return f"attempt-{attempt}{f'.rank{rank}' if rank else ''}.{suffix}"


def attempt_logs(run_dir: Path) -> dict[int, list[Path]]:
    """The log files of each attempt (local: attempt-N.log; SLURM: attempt-N.out and .err, and each
    other rank's attempt-N.rank<r>.out and .err)."""
    return {n: [run_dir / "logs" / name for name in names] for n, names in _attempt_names(run_dir).items()}


def attempt_count(run_dir: Path) -> int:
    """How many attempts the run has had (each leaves its logs); no Path per file: status counts thousands."""
    return len(_attempt_names(run_dir))


def _attempt_names(run_dir: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    try:
        names = sorted(os.listdir(f"{run_dir}/logs"))
    except OSError:
        return out
    for name in names:
        m = ATTEMPT_LOG.match(name)
        if m:
            out.setdefault(int(m.group(1)), []).append(name)
    return out


def new_attempt(run_dir: Path) -> int:
    """The next attempt's number (attempts are counted by their logs)."""
    return max(attempt_logs(run_dir), default=0) + 1


def log_tail(run_dir: Path, lines: int = 15) -> str | None:
    """The last lines of the latest attempt's log: rank 0's, stderr first (that is where tracebacks go),
    unless only another rank's stderr holds a traceback (the rank that died, which ended the others)."""
    attempts = attempt_logs(run_dir)
    if not attempts:
        return None
    texts = []
    for f in sorted(attempts[max(attempts)], key=lambda p: (_rank(p.name), p.suffix != ".err")):
        try:
            text = f.read_text(errors="replace").rstrip()
        except OSError:  # a SLURM log link whose target is gone
            continue
        if text:
            texts.append((f, text))
    if not texts:
        return None
    f, text = next(((f, t) for f, t in texts if f.suffix == ".err" and "Traceback" in t), texts[0])
    tail = text.splitlines()[-lines:]
    return "\n".join([f"[{f.name}]", *tail] if _rank(f.name) else tail)


def _rank(name: str) -> int:
    m = ATTEMPT_LOG.match(name)
    return int(m.group(2) or 0) if m else 0


def read_metrics(run_dir: Path | str) -> tuple[list[dict[str, Any]], str | None]:
    """metrics.jsonl's records ({step, loss} or {step, val_loss}) and None; or ([], why) when a line is not
    UTF-8, not an object or has a value of the wrong type: the curve is skipped. A torn line is skipped.

    The file is cut after its last newline: a line being appended is not part of the curve yet.
    """
    try:
        with open(f"{run_dir}/metrics.jsonl", "rb") as f:
            data = f.read()
    except OSError:
        return [], None
    records = []
    for n, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), 1):
        try:
            r = json.loads(line.decode())  # decoded first: json.loads would take bytes with a BOM for UTF-16
        except UnicodeDecodeError:
            return [], f"metrics.jsonl line {n} is not UTF-8 text"
        except ValueError:  # a line torn by a writer killed mid-write: skipped, as every reader does
            continue
        if not isinstance(r, dict):
            return [], f"metrics.jsonl line {n} is not an object"
        if not _IS[_INTEGER](r.get("step")):
            return [], f"metrics.jsonl line {n}: step is not an integer"
        for key in ("loss", "val_loss"):
            if r.get(key) is not None and not _IS[_NUMBER](r[key]):
                return [], f"metrics.jsonl line {n}: {key} is not a number"
        records.append(r)
    return records, None


def latest_loss(run_dir: Path, tail: int = 4096) -> float | None:
    """The last training loss in metrics.jsonl, from its last few KB (the file grows with every step)."""
    try:
        with open(run_dir / "metrics.jsonl", "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - tail, 0))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the first (cut) line, or one being written
            continue
        if isinstance(entry, dict) and isinstance(entry.get("loss"), int | float):
            return float(entry["loss"])
    return None


def planned_steps(run_dir: Path) -> int | None:
    """The steps a run trains, from its frozen config.yaml read as text (no YAML parser: status imports none):
    train.steps, or for the user's code the key `run.columns.steps` names (if any)."""
    try:
        text = (run_dir / "config.yaml").read_text()
    except OSError:
        return None
    key = _yaml_value(text, "run.columns.steps") if "\nrun:" in text or text.startswith("run:") else "train.steps"
    value = _yaml_value(text, key) if key else None
    return int(value) if value and value.isdigit() else None


def _yaml_value(text: str, key: str) -> str | None:
    """The scalar at a dotted key of YAML as config.frozen.to_yaml writes it (two-space indents, block maps)."""
    parts, depth = key.split("."), 0
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or line.lstrip().startswith("#") or indent > 2 * depth:
            continue
        if indent < 2 * depth:
            return None  # the section ended without the key
        name, _, value = line.strip().partition(":")
        if name.strip("'\"") == parts[depth]:
            if depth == len(parts) - 1:
                return value.strip().strip("'\"") or None
            depth += 1
    return None


def heartbeat(run_dir: Path) -> dict[str, Any] | None:
    """{pid, host, step, time} as training last wrote it; None when missing or not of that shape."""
    try:
        hb = json.loads((run_dir / "heartbeat.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(hb, dict) or not _IS[_NUMBER](hb.get("time", 0)) or not _IS[_INTEGER](hb.get("step") or 0):
        return None
    return hb
