"""Messages to the user in the QGIS message bar, with an action button where one helps
(e.g. "Create engine environment" when the engine is missing). Every message is also kept
in `history` and written to the log panel, so nothing shown is lost when the bar clears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qgis.core import Qgis
from qgis.PyQt.QtWidgets import QPushButton

from .tasks import log

_LEVEL_NAMES = {Qgis.Info: "info", Qgis.Warning: "warning", Qgis.Critical: "critical", Qgis.Success: "success"}


@dataclass
class Notice:
    title: str
    text: str
    level: int
    actions: list[str] = field(default_factory=list)

    @property
    def level_name(self) -> str:
        return _LEVEL_NAMES.get(self.level, str(self.level))


class Notifier:
    """Pushes messages to an iface's message bar; remembers them."""

    def __init__(self, iface, create_environment: Callable[[], None] | None = None):
        self.iface = iface
        self.create_environment = create_environment
        self.history: list[Notice] = []

    @property
    def last(self) -> Notice | None:
        return self.history[-1] if self.history else None

    def _push(self, title: str, text: str, level: int, duration: int,
              actions: list[tuple[str, Callable[[], None]]] = ()) -> Notice:
        notice = Notice(title, text, level, [label for label, _ in actions])
        self.history.append(notice)
        log(f"{title}: {text}", level if level != Qgis.Success else Qgis.Info)
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is None:
            return notice
        item = bar.createMessage(title, text)
        for label, callback in actions:
            button = QPushButton(label, item)
            button.clicked.connect(lambda _checked=False, run=callback: run())  # not `checked` as an argument
            item.layout().addWidget(button)
        bar.pushWidget(item, level, duration)
        return notice

    def info(self, title: str, text: str, duration: int = 6) -> Notice:
        return self._push(title, text, Qgis.Info, duration)

    def success(self, title: str, text: str, duration: int = 6) -> Notice:
        return self._push(title, text, Qgis.Success, duration)

    def warning(self, title: str, text: str, duration: int = 10) -> Notice:
        return self._push(title, text, Qgis.Warning, duration)

    def error(self, title: str, text: str, offer_environment: bool = False,
              show_log: bool = True) -> Notice:
        actions: list[tuple[str, Callable[[], None]]] = []
        if offer_environment and self.create_environment is not None:
            actions.append(("Create engine environment", self.create_environment))
        if show_log:
            actions.append(("Show log", self._open_log))
        return self._push(title, text, Qgis.Critical, 0, actions)

    def _open_log(self) -> None:
        try:
            self.iface.openMessageLog()
        except AttributeError:
            pass
