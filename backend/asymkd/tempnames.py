"""Names of the hidden temporary files and folders that atomic writes go through.

Kept apart from `fileio` so that `errors` can name the user's file for a temporary one
without importing the writers (which raise its errors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|partial|old)-(?P<pid>\d+)(?:\.[^.]*)?$")


def temp_name_of(final: Path, kind: str, keep_suffix: bool = True) -> Path:
    # a file keeps its suffix so writers that pick a format from it (GDAL) still can
    suffix = final.suffix if keep_suffix else ""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}{suffix}")


def temp_name(final: str | Path) -> Path:
    """The hidden temporary name beside `final` that this process writes it under (for
    writers that need a name of their own; `remove_stale` knows it)."""
    return temp_name_of(Path(final), "tmp")


def final_path(path: str | os.PathLike) -> str:
    """The final path a temporary path of this module stands for (else `path` itself), so
    messages name the file the user asked for."""
    p = Path(path)
    m = TEMP_PATTERN.match(p.name)
    return str(p.with_name(m.group("name"))) if m else str(path)
