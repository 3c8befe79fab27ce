"""Fake `asymkd` CLI. FAKE_ENGINE_MODE picks the behaviour:

ok         progress, log, metrics and a result, exit 0 (FAKE_ENGINE_RESULT: JSON paths)
echo       a result event whose paths hold the arguments it got, exit 0
sleep      progress every 0.1 s until terminated (SIGTERM -> error event, exit 130)
stubborn   like sleep but ignores SIGTERM (must be killed)
crash      a traceback on stderr, exit 1, no error event
error      an InternalError event and a traceback, exit 1
usererror  a DataError event with a hint, exit 2
nomodule   ModuleNotFoundError for torch on stderr, exit 1

The first event carries the protocol version FAKE_ENGINE_PROTOCOL (default 1.0; "none" leaves
it out, as an engine from before the protocol check would).
"""

import json
import os
import signal
import sys
import time

_FIRST = {"sent": False}


def emit(event, **fields):
    record = {"event": event, "time": time.time(), **fields}
    protocol = os.environ.get("FAKE_ENGINE_PROTOCOL", "1.0")
    if not _FIRST["sent"] and protocol != "none":
        record.update(protocol=protocol, engine="9.9.9" if protocol != "1.0" else "0.1.0")
    _FIRST["sent"] = True
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class Terminated(BaseException):
    pass


def _term(signum, frame):
    raise Terminated()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = os.environ.get("FAKE_ENGINE_MODE", "ok")
    command = argv[0] if argv else ""
    emit("step", step=command, status="started")
    if mode == "echo":
        emit("result", step=command, paths={str(i): a for i, a in enumerate(argv)})
        return 0
    if mode == "ok":
        for i in range(1, 6):
            emit("progress", step=command, done=i, total=5, fraction=i / 5, rate=10.0, unit="it", eta_s=0.1 * (5 - i))
            time.sleep(0.02)
        emit("log", level="info", message=f"fake {command} done")
        emit("metrics", step=command, metrics={"overall_accuracy": 0.5, "macro_f1": 0.25})
        emit("result", step=command, paths=json.loads(os.environ.get("FAKE_ENGINE_RESULT", "{}")))
        emit("step", step=command, status="finished")
        return 0
    if mode in ("sleep", "stubborn"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else _term)
        try:
            i = 0
            while True:
                i += 1
                emit("progress", step=command, done=i, total=10000, fraction=i / 10000, rate=10.0, eta_s=1000.0)
                time.sleep(0.1)
        except Terminated:
            emit("error", kind="Cancelled", message="cancelled", hint=None)
            return 130
    if mode == "crash":
        sys.stderr.write("Traceback (most recent call last):\n  File \"train.py\", line 1\n"
                         "RuntimeError: CUDA error: device-side assert triggered\n")
        return 1
    if mode == "error":
        emit("error", kind="InternalError", message="ValueError: fake engine bug in step " + command,
             hint="this is a bug; the traceback is on stderr")
        sys.stderr.write("Traceback (most recent call last):\nValueError: fake engine bug\n")
        return 1
    if mode == "usererror":
        emit("error", kind="DataError", message="the MS dataset has 2 bands", hint="point --ms to the MS patches")
        return 2
    if mode == "nomodule":
        sys.stderr.write("Traceback (most recent call last):\nModuleNotFoundError: No module named 'torch'\n")
        return 1
    return 3
