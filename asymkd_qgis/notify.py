"""Messages to the user in the QGIS message bar, with an action button where one helps
(e.g. "Create engine environment" when the engine is missing). Every message is also kept
in `history` and written to the log panel, so nothing shown is lost when the bar clears.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field
from typing import Callable

from qgis.core import Qgis
from qgis.PyQt.QtWidgets import QPushButton

from .tasks import log

_LEVEL_NAMES = {Qgis.MessageLevel.Info: "info", Qgis.MessageLevel.Warning: "warning",
                Qgis.MessageLevel.Critical: "critical", Qgis.MessageLevel.Success: "success"}


def rich_text(text: str) -> str:
    """Plain text for a Qt widget that renders rich text: `torch<2.15` must stay visible."""
    return html.escape(text).replace("\n", "<br>")


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
        self._sticky: dict[str, list] = {}  # key -> message bar items that stay until cleared

    @property
    def last(self) -> Notice | None:
        return self.history[-1] if self.history else None

    def _push(self, title: str, text: str, level: int, duration: int,
              actions: list[tuple[str, Callable[[], None]]] = (), key: str = "") -> Notice:
        notice = Notice(title, text, level, [label for label, _ in actions])
        self.history.append(notice)
        log(f"{title}: {text}", level if level != Qgis.MessageLevel.Success else Qgis.MessageLevel.Info)
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is None:
            return notice
        item = bar.createMessage(rich_text(title), rich_text(text))
        if key and duration == 0:
            self._sticky.setdefault(key, []).append(item)
        for label, callback in actions:
            button = QPushButton(label, item)
            button.clicked.connect(lambda _checked=False, run=callback: run())  # not `checked` as an argument
            item.layout().addWidget(button)
        bar.pushWidget(item, level, duration)
        return notice

    def clear(self, key: str) -> None:
        """Take the messages pushed with this key off the bar (e.g. a step's old error once it
        succeeds), so an old red error never sits under a later success."""
        bar = self.iface.messageBar() if self.iface is not None else None
        for item in self._sticky.pop(key, []):
            try:
                if bar is not None:
                    bar.popWidget(item)
            except RuntimeError:  # already closed by the user
                pass

    def info(self, title: str, text: str, duration: int = 6) -> Notice:
        return self._push(title, text, Qgis.MessageLevel.Info, duration)

    def success(self, title: str, text: str, duration: int = 6, key: str = "") -> Notice:
        if key:
            self.clear(key)
        return self._push(title, text, Qgis.MessageLevel.Success, duration)

    def warning(self, title: str, text: str, duration: int = 10) -> Notice:
        return self._push(title, text, Qgis.MessageLevel.Warning, duration)

    def error(self, title: str, text: str, offer_environment: bool = False,
              show_log: bool = True, key: str = "") -> Notice:
        actions: list[tuple[str, Callable[[], None]]] = []
        if offer_environment and self.create_environment is not None:
            actions.append(("Create engine environment", self.create_environment))
        if show_log:
            actions.append(("Show log", self._open_log))
        if key:
            self.clear(key)  # one error per key: the latest
        return self._push(title, text, Qgis.MessageLevel.Critical, 0, actions, key)

    def _open_log(self) -> None:
        with contextlib.suppress(AttributeError):
            self.iface.openMessageLog()
