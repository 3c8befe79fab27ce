from __future__ import annotations

import json

from ..doctor import doctor_report


def add_arguments(parser) -> None:
    pass


def run(args, events) -> int:
    report = doctor_report()
    events.emit("doctor", report=report)
    if args.events != "-":
        print(json.dumps(report, indent=2))
    return 0
