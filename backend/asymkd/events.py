"""JSON-lines event stream and terminal progress.

Every long job reports through an `Events` object. With `--events FILE|-` each event is
one JSON object per line (the protocol the QGIS plugin reads, see docs/events.md); on a terminal a
tqdm bar is shown as well. Events are flushed at once so a reader sees them live.

The first event of a stream also carries `protocol` (PROTOCOL_VERSION) and `engine` (the
engine version), so that a reader can refuse a stream it does not understand.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any, Iterable, Iterator, TextIO, TypeVar

from . import __version__

T = TypeVar("T")

# "major.minor": a reader refuses another major (fields removed or changed in meaning);
# a new minor only adds events or fields.
PROTOCOL_VERSION = "1.0"


def jsonable(value: Any) -> Any:
    """Plain JSON values from numpy scalars/arrays, paths and containers; NaN and infinity
    become null (JSON has neither). Events and every metrics file go through this."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Events:
    """Emits events to an optional JSON-lines stream and an optional terminal bar."""

    def __init__(self, stream: TextIO | None = None, progress_bars: bool | None = None,
                 min_interval_s: float = 0.5):
        self.stream = stream
        if progress_bars is None:
            progress_bars = sys.stderr.isatty()
        self.progress_bars = progress_bars
        self.min_interval_s = min_interval_s
        self._last_progress: dict[str, float] = {}
        self._bars: dict[str, Any] = {}
        self.copies: list[TextIO] = []  # e.g. RUN/events.jsonl beside the user's stream
        self._introduced = False  # whether the protocol version has been sent

    # -- raw -------------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        targets = ([self.stream] if self.stream is not None else []) + self.copies
        if not targets:
            return
        record = {"event": event, "time": round(time.time(), 3), **jsonable(fields)}
        if not self._introduced:
            record.update(protocol=PROTOCOL_VERSION, engine=__version__)
            self._introduced = True
        line = json.dumps(record, ensure_ascii=False) + "\n"
        for target in targets:
            target.write(line)
            target.flush()

    @contextlib.contextmanager
    def copy_to(self, path: Any) -> Iterator[None]:
        """Also append every event to `path` while the block runs."""
        with open(path, "a", encoding="utf-8") as f:
            self.copies.append(f)
            try:
                yield
            finally:
                self.copies.remove(f)

    # -- typed helpers ---------------------------------------------------------------
    def log(self, message: str, level: str = "info") -> None:
        self.emit("log", level=level, message=message)
        if self.stream is not sys.stdout and level != "debug":
            print(message, file=sys.stderr, flush=True)

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)
        if self.stream is not sys.stdout:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def metrics(self, step: str, metrics: dict[str, Any]) -> None:
        self.emit("metrics", step=step, metrics=metrics)

    def result(self, step: str, **paths: Any) -> None:
        self.emit("result", step=step, paths={k: str(v) for k, v in paths.items()})

    def error(self, message: str, kind: str = "error", hint: str | None = None) -> None:
        self.emit("error", kind=kind, message=message, hint=hint)

    def progress(self, step: str, done: int, total: int, started: float,
                 unit: str = "it", force: bool = False, **extra: Any) -> None:
        """Emit a progress event, throttled to one per `min_interval_s` per step; on a
        terminal also draw the step's bar."""
        if self.progress_bars:
            self._draw(step, done, total, unit, extra)
        now = time.time()
        if not force and done < total and now - self._last_progress.get(step, 0.0) < self.min_interval_s:
            return
        self._last_progress[step] = now
        elapsed = max(now - started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 and total else None
        self.emit("progress", step=step, done=done, total=total,
                  fraction=(done / total if total else 1.0), rate=round(rate, 3), unit=unit,
                  elapsed_s=round(elapsed, 2), eta_s=(round(eta, 1) if eta is not None else None),
                  **extra)

    def _draw(self, step: str, done: int, total: int, unit: str, extra: dict[str, Any]) -> None:
        from tqdm import tqdm
        bar = self._bars.get(step)
        if bar is None and done >= total:
            return  # a finished step (e.g. its closing report) opens no new bar
        if bar is None:
            bar = self._bars[step] = tqdm(total=total, desc=step, unit=unit, leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in extra.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if shown:
            bar.set_postfix(shown, refresh=False)
        if done >= total:
            bar.close()
            del self._bars[step]

    @contextlib.contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[None]:
        """Bracket a job step with `step` started/finished (or failed) events."""
        start = time.time()
        self.emit("step", step=name, status="started", **fields)
        try:
            yield
        except BaseException as exc:
            self.emit("step", step=name, status="failed", error=str(exc) or type(exc).__name__,
                      elapsed_s=round(time.time() - start, 2))
            raise
        self.emit("step", step=name, status="finished", elapsed_s=round(time.time() - start, 2))

    def track(self, items: Iterable[T], total: int, step: str, unit: str = "it") -> Iterator[T]:
        """Iterate with progress events (and, on a terminal, the step's bar via progress())."""
        start = time.time()
        for done, item in enumerate(items, 1):
            yield item
            self.progress(step, done, total, start, unit=unit, force=done == total)


NULL_EVENTS = Events(stream=None, progress_bars=False)
