"""One writer per run folder: every command that writes into a run folder holds its lock.

    with hold(run_dir, "distill"):   # StorageError (exit 2) naming the holder when another
        ...                          # process holds it

The lock is an exclusive `flock` on the hidden file RUN/.lock (`layout.LOCK`), which also
records the holder (pid, host, command, start time) for the message a second command gets.
The OS releases a flock when its process ends in any way, `kill -9` included, so a lock
left by a killed process is free at once; the file itself stays (removing it would let a
process that opened it before the removal lock a file nobody else sees). Under torchrun
the job's rank 0 holds the lock for all its ranks (`commands/_options.run_folder_lock`).
Where the OS has no flock (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .errors import StorageError
from .layout import LOCK

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder's lock."""

    pid: int
    host: str
    command: str
    started: str  # local time, ISO 8601

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"`asymkd {self.command}` (pid {self.pid}{where}, started {self.started})"


def _read_holder(fd: int) -> Holder | None:
    try:
        doc = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return Holder(int(doc["pid"]), str(doc["host"]), str(doc["command"]), str(doc["started"]))
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or by something else
        return None


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(holder)).encode("utf-8"), 0)


def _refusal(run_dir: Path, holder: Holder | None) -> StorageError:
    who = holder.describe() if holder is not None else "another asymkd command"
    stop = f" (kill {holder.pid})" if holder is not None else ""
    return StorageError(f"the run folder {run_dir} is in use: {who} is writing into it",
                        f"wait until it has finished, or stop it{stop}; two commands writing into one "
                        "run folder would replace each other's files")


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise StorageError(f"{path} is a symbolic link, not the run folder's lock file",
                           "remove it; the next command makes the lock file again") from None


@contextlib.contextmanager
def hold(run_dir: str | Path, command: str) -> Iterator[Holder]:
    """Hold the exclusive lock of `run_dir` (created if missing) while the block runs;
    a StorageError naming the holder when another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    me = Holder(os.getpid(), socket.gethostname(), command,
                datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    if fcntl is None:
        yield me
        return
    fd = _open(run_dir / LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(run_dir, _read_holder(fd)) from None
        _write_holder(fd, me)
        try:
            yield me
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # released: no holder left to name
    finally:
        os.close(fd)  # closing releases the lock

