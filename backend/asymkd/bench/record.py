"""`asymkd bench ... --markdown FILE`: a benchmark's results as a section of a Markdown file.

The section names the command, the date, the commit and the machine, holds what the
benchmark printed and any tables it adds (`table`), and replaces the section an earlier
run of the same command wrote, so `docs/benchmarks.md` keeps one current section per
command and its hand-written history below stays as it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import subprocess
import sys
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, TextIO

from ..errors import DataError
from ..fileio import atomic_write_text

HEADING = "## Generated results"
_INTRO = ("Each section below is written by the command it names with `--markdown docs/benchmarks.md`, "
          "and replaced when that command runs again.")
# flags whose values change where a benchmark works, not what it measures
_LOCAL_FLAGS = {"--markdown", "--out", "--workdir", "--events"}


class Recording:
    """What a benchmark prints (stdout, still shown) and the Markdown tables it adds."""

    def __init__(self) -> None:
        self.printed = io.StringIO()
        self.tables: list[str] = []
        self.started = time.time()


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


_ACTIVE: ContextVar[Recording | None] = ContextVar("bench_recording", default=None)


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    rec = Recording()
    token = _ACTIVE.set(rec)
    old = sys.stdout
    sys.stdout = _Tee(old, rec.printed)
    try:
        yield rec
    finally:
        sys.stdout = old
        _ACTIVE.reset(token)


def table(markdown: str) -> None:
    """Add a Markdown table to the section being recorded (nothing when none is)."""
    rec = _ACTIVE.get()
    if rec is not None:
        rec.tables.append(markdown.rstrip("\n"))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(kind: str, argv: list[str]) -> str:
    """`asymkd bench KIND ARGV` without the flags that only say where a benchmark works:
    the key of its section."""
    words: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word.split("=", 1)[0] in _LOCAL_FLAGS:
            skip = "=" not in word
            continue
        words.append(word)
    return " ".join(["asymkd bench", kind, *words])


def commit() -> str:
    """The checkout's commit (with "+changes" when files differ from it), else "unknown"."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{platform.machine()}, {cores} CPU cores"
    gpu = _gpu_name()
    return text + (f", {gpu}" if gpu else ", no GPU")


def _gpu_name() -> str | None:
    torch = sys.modules.get("torch")  # only when the benchmark imported it: no import for this line
    if torch is None or not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def section(command: str, rec: Recording) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"<!-- section: {command} -->", f"### `{command}`", "",
             f"{when}, commit {commit()}, {machine()}, wall time {time.time() - rec.started:.0f} s.", ""]
    for t in rec.tables:
        lines += [t, ""]
    printed = rec.printed.getvalue().rstrip("\n")
    if printed:
        lines += ["<details><summary>printed</summary>", "", "```", printed, "```", "", "</details>", ""]
    lines.append("<!-- end section -->")
    return "\n".join(lines) + "\n"


def check(path: str | Path) -> None:
    """Refuse a file that the section could not be written to, before a long benchmark."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise DataError(f"cannot write {path} (--markdown): " + ("it is a folder" if path.is_dir() else
                        f"the folder {path.parent} does not exist"), "give a Markdown file in an existing folder")
    if path.exists():
        _read(path)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} (--markdown): {exc}", "give a Markdown file, or a new file name") from exc


def write(path: str | Path, command: str, rec: Recording) -> Path:
    """Put the section of `command` into the Markdown file `path` (created when missing):
    in place of its earlier section, else at the end of the part under HEADING."""
    path = Path(path)
    text = _read(path) if path.exists() else "# Benchmarks\n"
    new = section(command, rec)
    pattern = re.compile(rf"<!-- section: {re.escape(command)} -->\n.*?<!-- end section -->\n", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text, count=1)
    else:  # last in the generated part, before the hand-written sections that follow it
        if HEADING not in text:  # before the first hand-written section
            first = text.find("\n## ")
            first = len(text) if first < 0 else first + 1
            text = text[:first].rstrip("\n") + f"\n\n{HEADING}\n\n{_INTRO}\n\n" + text[first:]
        start = text.index(HEADING)
        end = text.find("\n## ", start + len(HEADING))
        end = len(text) if end < 0 else end + 1
        text = text[:end].rstrip("\n") + "\n\n" + new + ("\n" + text[end:] if end < len(text) else "")
    return atomic_write_text(path, text)
