#!/usr/bin/env python3
"""Fail on Qt5-only constructs in the plugin, so it keeps loading in QGIS 4 (Qt6/PyQt6).

  tools/qt6_check.py [PATH ...]      (default: asymkd_qgis/)

Flags, with file:line and the Qt5/Qt6-neutral spelling:
- PyQt5/PyQt6 imported directly (use qgis.PyQt),
- unscoped Qt enums such as `Qt.AlignLeft`, `QMessageBox.Yes` (PyQt6 knows only
  `Qt.AlignmentFlag.AlignLeft`, `QMessageBox.StandardButton.Yes`; QGIS 3.22 accepts both),
- `exec_()` and `print_()`, and classes or methods Qt6 removed (QRegExp, QDesktopWidget, ...),
- QAction/QShortcut/QActionGroup from QtWidgets outside a try/except ImportError (QtGui in Qt6).
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Qt's classes and QGIS's own (QGIS 4 builds also want scoped enums; QGIS 3.22 accepts them).
QT_CLASS = re.compile(r"^Q[A-Za-z]\w*$")
REMOVED_NAMES = {
    "QRegExp": "QRegularExpression", "QRegExpValidator": "QRegularExpressionValidator",
    "QDesktopWidget": "QScreen (QGuiApplication.primaryScreen())", "QGLWidget": "QOpenGLWidget",
    "QSound": "QSoundEffect", "QMatrix": "QTransform",
    "QWebView": "QtWebEngine or QTextBrowser", "QtWebKit": "QtWebEngine", "QtWebKitWidgets": "QtWebEngine",
}
REMOVED_METHODS = {"exec_": "exec()", "print_": "print()", "desktop": "QGuiApplication.screens()",
                   "globalPos": "globalPosition().toPoint()", "delta": "angleDelta()",
                   "setMargin": "setContentsMargins()"}
MOVED_TO_GUI = {"QAction", "QActionGroup", "QShortcut", "QFileSystemModel", "QUndoCommand", "QUndoStack"}
# Upper-case attributes of Qt classes that are classes or scoped-enum types, not enum values.
NOT_ENUM_VALUES = {"Signal", "Slot"}


@dataclass
class Finding:
    path: Path
    line: int
    text: str

    def __str__(self) -> str:
        try:
            shown = self.path.relative_to(REPO)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.text}"


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_import_fallback(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            names = [h.type for h in node.handlers]
            return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in names)
    return False


def _enum_value(node: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> bool:
    """Qt.AlignLeft (value of an unscoped enum), not Qt.AlignmentFlag.AlignLeft or QMessageBox.question."""
    if not (isinstance(node.value, ast.Name) and QT_CLASS.match(node.value.id)):
        return False
    if not node.attr[:1].isupper() or node.attr in NOT_ENUM_VALUES or node.attr.isupper():
        return False  # methods, and constants such as Qgis.QGIS_VERSION
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute) and parent.value is node:
        return False  # Qt.AlignmentFlag.AlignLeft: node is the enum type
    # not a nested class constructed: QFormLayout.TakeRowResult(...)
    return not (isinstance(parent, ast.Call) and parent.func is node)


def _import_findings(path: Path, node: ast.Import | ast.ImportFrom, parents: dict[ast.AST, ast.AST]) -> list[Finding]:
    found: list[Finding] = []
    modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    for module in modules:
        if module.split(".")[0] in ("PyQt5", "PyQt6", "PySide2", "PySide6"):
            found.append(Finding(path, node.lineno, f"import of {module}: import from qgis.PyQt instead"))
    if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("QtWidgets"):
        moved = sorted(MOVED_TO_GUI & {a.name for a in node.names})
        if moved and not _in_import_fallback(node, parents):
            found.append(Finding(path, node.lineno, f"{', '.join(moved)} from QtWidgets: QtGui in Qt6 "
                                 "(try QtGui, except ImportError: QtWidgets)"))
    for alias in node.names:
        if alias.name in REMOVED_NAMES:
            found.append(Finding(path, node.lineno,
                                 f"{alias.name} was removed in Qt6: use {REMOVED_NAMES[alias.name]}"))
    return found


def _attribute_findings(path: Path, node: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> list[Finding]:
    if node.attr in REMOVED_METHODS and isinstance(parents.get(node), ast.Call):
        return [Finding(path, node.lineno, f".{node.attr}() is gone in Qt6: use {REMOVED_METHODS[node.attr]}")]
    enum = node.value
    if isinstance(enum, ast.Name) and _enum_value(node, parents):
        return [Finding(path, node.lineno,
                        f"unscoped enum {enum.id}.{node.attr}: write {enum.id}.<EnumType>.{node.attr}")]
    return []


def check_source(path: Path, source: str) -> list[Finding]:
    tree = ast.parse(source, filename=str(path))
    parents = _parents(tree)
    found: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += _import_findings(path, node, parents)
        elif isinstance(node, ast.Attribute):
            found += _attribute_findings(path, node, parents)
        elif isinstance(node, ast.Name) and node.id in REMOVED_NAMES and REMOVED_NAMES[node.id]:
            found.append(Finding(path, node.lineno, f"{node.id} was removed in Qt6: use {REMOVED_NAMES[node.id]}"))
    unique = {(f.line, f.text): f for f in found}
    return sorted(unique.values(), key=lambda f: f.line)


def check_paths(paths: list[Path]) -> list[Finding]:
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("*.py")))]
    findings: list[Finding] = []
    for file in files:
        findings += check_source(file, file.read_text(encoding="utf-8"))
    return findings


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a).resolve() for a in args] or [REPO / "asymkd_qgis"]
    findings = check_paths(paths)
    for finding in findings:
        print(finding)
    if findings:
        print(f"{len(findings)} Qt5-only construct(s): QGIS 4 (Qt6) would not load the plugin.", file=sys.stderr)
        return 1
    shown = ", ".join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths)
    print(f"Qt6 check: no Qt5-only constructs in {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
