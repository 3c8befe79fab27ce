from __future__ import annotations

from ..doctor import doctor_report
from ._report import send_report


def add_arguments(parser) -> None:
    pass


def run(args, events) -> int:
    return send_report(args, events, "doctor", "report", doctor_report())
