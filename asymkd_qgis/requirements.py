"""The engine's pinned requirements file, read in one place: by the plugin when it creates the
engine environment, by the offline bundle's builder and by the tests. No Qt, no QGIS: the
tools import it outside QGIS."""

from __future__ import annotations

import re
from pathlib import Path

TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file: comments and blank lines dropped."""
    lines = (raw.split("#", 1)[0].strip() for raw in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0]


def normalize(name: str) -> str:
    """A project name as wheel file names spell it (PEP 503 + underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned(line: str) -> str | None:
    """The version a line pins with == or ===, or None."""
    match = re.search(r"===?\s*([^\s,;]+)", line)
    return match.group(1) if match else None


def pins(path: Path) -> list[tuple[str, str]]:
    """(name, version) of every pinned line of a requirements file."""
    out = []
    for line in requirement_lines(path):
        version = pinned(line)
        if version is not None:
            out.append((requirement_name(line), version))
    return out


def split_requirements(path: Path | None) -> tuple[list[str], list[str]]:
    """(torch lines, other lines) of a pinned requirements file."""
    torch_lines: list[str] = []
    other: list[str] = []
    for line in requirement_lines(path) if path is not None else []:
        (torch_lines if requirement_name(line).lower() in TORCH_PACKAGES else other).append(line)
    return torch_lines, other
