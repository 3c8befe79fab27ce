"""Output of the commands that only report (doctor, choices)."""

from __future__ import annotations

import json
from typing import Any


def send_report(args, events, event: str, key: str, report: dict[str, Any]) -> int:
    """The report as one event, and as JSON on stdout unless stdout carries the events."""
    events.emit(event, **{key: report})
    if args.events != "-":
        print(json.dumps(report, indent=2))
    return 0
