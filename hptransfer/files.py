"""Files: atomic writes (a reader sees the old file or the new one, never half of either), appends of
whole lines, JSON-lines reading that survives a torn line, disk-full errors, and rows to Arrow.

Every file is created with mode 0666 and every folder with 0777, less the umask (as `open` and
`mkdir` do): on a group project folder with umask 0002, collaborators read and write the results.
"""

import ctypes
import errno
import fcntl
import io
import json
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hptransfer.errors import HptError

if TYPE_CHECKING:  # imported where used: a training job writes files, it needs no Arrow
    import pyarrow as pa

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_EXIT = 75  # EX_TEMPFAIL: a job stopped by a full disk (no result: the same command resumes it)


class DiskFull(HptError, OSError):
    """No space left (or quota exceeded) while writing: one line saying where and how much; the
    command that hit it resumes once space is freed. Also an OSError, with the errno it came from."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        OSError.__init__(self, code, message)

    def __str__(self) -> str:
        return self.args[1]


def disk_full(err: BaseException | None) -> bool:
    """Is this error (or one it was raised from, e.g. inside torch.save) a full disk or quota?"""
    return _disk_full_errno(err) is not None


def _disk_full_errno(err: BaseException | None) -> int | None:
    """The full-disk errno in this error's chain of causes, if any."""
    return next((e.errno for e in _chain(err) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS), None)


def disk_full_error(err: BaseException, where: Path | str, needed: int | None = None) -> DiskFull:
    """The one-line DiskFull for a failed write of `needed` bytes to `where`."""
    if isinstance(err, DiskFull):
        return err
    code = _disk_full_errno(err) or errno.ENOSPC
    what = "disk quota exceeded" if code == errno.EDQUOT else "disk full"
    need = f"{human_bytes(needed)} needed, " if needed else ""
    free = free_bytes(where)
    have = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    return DiskFull(f"{what}: could not write {where} ({need}{have}); free some space and run the same "
                    f"command again: it resumes where it stopped", code)


def _chain(err: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and len(out) < 8:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def free_bytes(path: Path | str) -> int | None:
    """Bytes free to this user on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path)
    for candidate in (p, *p.parents):
        with suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def human_bytes(n: float) -> str:
    unit = "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if n < 1000:
            break
        n, unit = n / 1000, bigger
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path`, mode 0666 less the umask (mkstemp's 0600 would survive the rename)."""
    while True:
        tmp = f"{path.parent}/.{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync'd, then renamed.

    A full disk is a DiskFull naming the file and the bytes it needed; the temp file is removed.
    """
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        try:
            _write_all(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if disk_full(err):
            raise disk_full_error(err, path, len(blob)) from err
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
            fd = os.open(tmp, flags, 0o666)  # less the umask, as any new file
            tmps.append((tmp, str(path)))
            try:
                _write_all(fd, data.encode() if isinstance(data, str) else data)
            finally:
                os.close(fd)
        if tmps:
            sync_filesystem(Path(tmps[0][1]).parent)
        for tmp, path in tmps:
            os.replace(tmp, path)
    except BaseException as err:
        for tmp, _ in tmps:
            Path(tmp).unlink(missing_ok=True)
        if disk_full(err) and files:
            needed = sum(len(d) for d in files.values())
            first = Path(next(iter(files)))
            where = first if len(files) == 1 else f"{len(files)} files under {first.parent.parent}"
            raise disk_full_error(err, where, needed) from err
        raise


def append_lines(path: Path | str, text: str | bytes) -> None:
    """Append whole lines in one write: on a fresh line, and all of them or none.

    Under an exclusive lock on the file, its last byte is checked and a newline added when a writer
    killed mid-line left a torn one (the torn line stays unreadable; the new records do not join it).
    A write that fails (a full disk) is cut off again, so no half line is left behind. Concurrent
    appenders never interleave. A full disk is a DiskFull naming the file.
    """
    data = text.encode() if isinstance(text, str) else text
    if not data:
        return
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            _write_all(fd, data)
        except BaseException as err:
            with suppress(OSError):
                os.ftruncate(fd, size)  # all or nothing (truncating never needs space)
            if disk_full(err):
                raise disk_full_error(err, path, len(data)) from err
            raise
    finally:
        os.close(fd)  # releases the lock


def json_lines(path: Path | str) -> list[Any]:
    """The records of a JSON-lines file, in one parse; line by line (skipping torn ones) only when needed.

    A missing file has no records. A line torn by a writer killed mid-write, or one that is not
    UTF-8, is skipped, never fatal. Records are JSON values: callers check their shape.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.splitlines()
    try:
        return json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:  # a torn line (JSONDecodeError) or bytes that are not UTF-8 (UnicodeDecodeError)
        records = []
        for line in lines:
            with suppress(ValueError):
                records.append(json.loads(line.decode()))  # UTF-8 only (bytes would be sniffed for UTF-16)
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


def read_json(path: Path) -> Any | None:
    """A JSON file's content; None when it is missing, unreadable or half-written (being replaced)."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def write_figure(fig: Any, path: Path, dpi: int = 130) -> None:
    """A matplotlib figure as a PNG, rendered in memory and written atomically (a reader never sees half a
    PNG, the file gets the umask's mode, a full disk is one line); the figure is closed either way."""
    import matplotlib.pyplot as plt  # here: only a figure's writer needs matplotlib, and it is slow to import

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_atomic(path, buf.getvalue())


def exit_process(code: int) -> None:
    """End this process now, its output flushed, without the interpreter's teardown: DDP keeps the gloo
    group's threads alive after destroy_process_group, and one releasing its last work's tensor during the
    teardown aborts the process (torch 2.13: about one exit in ten), after the run has ended well."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def signals_deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
                     ) -> Iterator[None]:
    """Hold these signals' Python handlers back while the block writes a file, then run them.

    A handler that raises (Ctrl-C's KeyboardInterrupt, submitit's requeue exit) inside torch.save's
    callbacks into a Python file surfaces as a RuntimeError from torch, which a training loop would take
    for the run's own failure. Outside the main thread (no handlers run there) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: signal.getsignal(s) for s in signals}
    held = {s: h for s, h in held.items() if h is not None}  # None: a handler not set from Python, left alone
    for s in held:
        signal.signal(s, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        for s in caught:
            signal.raise_signal(s)
