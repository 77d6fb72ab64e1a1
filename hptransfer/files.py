"""Files: atomic writes (a reader sees the old file or the new one, never half of either), JSON-lines
reading that survives a torn line, and rows to Arrow."""

import ctypes
import io
import json
import os
import tempfile
from contextlib import suppress
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: a training job writes files, it needs no Arrow
    import pyarrow as pa


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync'd, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_many_atomic(files: dict[Path, str | bytes]) -> None:
    """`write_atomic` for many files at the cost of one flush: every temp file is written, the file
    system is synced once, then each is renamed into place (a rename never exposes unflushed data).

    10,000 small files in new folders take ~1 s this way, against ~4 s with an fsync each. The
    files share one file system (a sweep folder's): the one holding the first is synced.
    """
    tmps: list[tuple[str, str]] = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        for i, (path, data) in enumerate(files.items()):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{os.path.basename(path)}.{os.getpid()}-{i}.tmp"  # O_EXCL: never another's
            fd = os.open(tmp, flags, 0o644)
            tmps.append((tmp, str(path)))
            try:
                view = memoryview(data.encode() if isinstance(data, str) else data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        if tmps:
            sync_filesystem(Path(tmps[0][1]).parent)
        for tmp, path in tmps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in tmps:
            Path(tmp).unlink(missing_ok=True)
        raise


def json_lines(path: Path | str) -> list[Any]:
    """The records of a JSON-lines file, in one parse; line by line (skipping torn ones) only when needed.

    A missing file has no records. A line torn by a writer killed mid-write is skipped, never fatal.
    """
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.splitlines()
    try:
        return json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        records = []
        for line in lines:
            with suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding `path` (Linux syncfs; elsewhere, or if it fails, a global sync)."""
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "syncfs") else None
    except OSError:
        return None


def arrow_table(rows: list[dict[str, Any]], schema: "pa.Schema | None" = None) -> "pa.Table":
    """Rows (dicts of JSON values) as an Arrow table: `schema`'s columns and types, else the rows'
    keys in first-seen order with types inferred over all rows at once.

    Through Arrow's JSON reader, which is faster than converting Python objects and, unlike that
    conversion, does not import pandas (0.3 s of every `hpt sweep` and `hpt collect`).
    """
    # here: a training job writes files and never needs Arrow (0.4 s to import)
    import pyarrow as pa
    import pyarrow.json as pa_json

    try:
        data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode()
        if not data:
            raise ValueError("no rows")
        table = pa_json.read_json(io.BytesIO(data), read_options=pa_json.ReadOptions(block_size=len(data) + 1),
                                  parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                                                     unexpected_field_behavior="ignore"))
        return table if schema is None else table.select(schema.names)
    except (ValueError, TypeError, pa.ArrowInvalid):  # no rows, or a value JSON cannot hold (inf)
        if schema is not None:
            return pa.Table.from_pylist(rows, schema=schema)
        columns = dict.fromkeys(k for r in rows for k in r)
        return pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in columns})
