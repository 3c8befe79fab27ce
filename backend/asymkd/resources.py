"""Which files an input stands for, and whether an output would overwrite one of them.

An input is more than its path: GDAL reads a VRT's sources, a raster's `.aux.xml`, world
file and external overviews; a shapefile is several files; the same file can be reached
through a hard link or a symbolic link. `files_behind(path)` lists them all (GDAL's own file
list, followed into the files it names), and `check_outputs_clear(outputs, inputs)` refuses an
output that is one of them by identity (device and inode, so links are caught) or that
resolves to the same place, before any work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ConfigError

# sibling files of a shapefile (GDAL reads or writes them with the .shp)
_SHAPEFILE_PARTS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".shp.xml")
MAX_DEPTH = 3        # VRT -> VRT -> source: how deep the file lists are followed
MAX_FILES = 10_000   # a mosaic VRT of many sources: the list is cut there


def _local(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" not in text and not text.startswith("/vsi")


def _gdal_files(path: str) -> list[str]:
    """GDAL's file list of a raster (the file, VRT sources, .aux.xml, world file, overviews);
    empty when GDAL cannot open it as a raster."""
    import rasterio
    from rasterio.errors import RasterioError
    try:
        with rasterio.Env(CPL_LOG_ERRORS=False), rasterio.open(path) as ds:
            return [str(f) for f in ds.files]
    except (RasterioError, OSError, ValueError):
        return []


def files_behind(path: str | Path) -> list[Path]:
    """`path` and every local file that reading it reads (or that belongs to it)."""
    first = Path(path)
    found: dict[str, Path] = {}
    todo: list[tuple[Path, int]] = [(first, 0)]
    while todo and len(found) < MAX_FILES:
        p, depth = todo.pop()
        key = os.path.normpath(os.path.abspath(p))
        if key in found:
            continue
        found[key] = p
        if not _local(p) or not p.is_file():
            continue
        if p.suffix.lower() == ".shp":
            stem = str(p)[: -len(p.suffix)]
            todo += [(Path(stem + part), MAX_DEPTH) for part in _SHAPEFILE_PARTS]
        if depth < MAX_DEPTH and not str(p).lower().endswith((".aux.xml", ".ovr", ".aux")):
            base = p.parent
            for f in _gdal_files(str(p)):
                fp = Path(f) if os.path.isabs(f) or not _local(f) else base / f
                todo.append((fp, depth + 1))
    return list(found.values())


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symbolic links: the file itself
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symbolic-link loop
        return os.path.abspath(path)


def check_outputs_clear(outputs: Iterable[Path | str | None], inputs: Sequence[Path | str | None]) -> None:
    """Refuse (ConfigError, exit 2) an output that is an input or any file behind one: the
    same file (device and inode: hard and symbolic links included) or the same resolved path."""
    behind: list[tuple[Path, Path, tuple[int, int] | None, str]] = []
    for inp in inputs:
        if inp is None or not _local(inp):
            continue
        for f in files_behind(inp):
            if _local(f):
                behind.append((Path(inp), f, _identity(f), _resolved(f)))
    for out in outputs:
        if out is None:
            continue
        out = Path(out)
        ident, where = _identity(out), _resolved(out)
        for inp, f, f_ident, f_where in behind:
            if where == f_where or (ident is not None and ident == f_ident):
                what = (f"the input {inp}" if f == inp else f"{f}, a file the input {inp} reads")
                raise ConfigError(f"output {out} is {what}; it would be overwritten",
                                  "write the outputs to another file name (not a link to an input or to a "
                                  "file it reads, such as a VRT's source, an .aux.xml or an overview)")
