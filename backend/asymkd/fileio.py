"""Atomic file and folder writes: a kill at any moment leaves the old state or the new one.

Every writer of the engine goes through here:

    with temp_path(final) as tmp:      # hidden temporary name beside `final`
        write_something(tmp)           # any writer that takes a path (torch.save, rasterio...)
    # on success `tmp` was renamed onto `final`; on an exception, Ctrl-C or SIGTERM
    # (raised as an exception in the main thread) `tmp` was removed and `final` is untouched

    atomic_write_text(path, text)      # the same for text, bytes, .npy and .npz
    atomic_write_bytes(path, data)
    atomic_save_npy(path, array)
    atomic_save_npz(path, **arrays)

    with staged_dir(final_dir) as stage:   # a whole folder: build it under `stage`,
        ...                                # then it replaces `final_dir` in one step

Temporary names start with "." and carry ".tmp-<pid>" (files, keeping the suffix so
GDAL still knows the format) or ".partial-<pid>" (folders), in the final path's own folder
so the rename stays on one file system. A `kill -9` cannot run cleanup code;
`remove_stale(final)` (called by every helper here) removes what a dead process left beside
`final`. `tempnames.final_path(tmp)` maps a temporary name back, so messages name the user's file.

`written_first(root, action)` runs `action` right before the first of these writes under
`root` (a command writes a run's config.yaml so: once the step's checks have passed).

Reading back the engine's own files (metrics, metadata, pairs, soft labels): `read_regular`
opens only a regular file in the folder named, never through a symbolic link, so a run
folder cannot make a command read (and a report embed) a file outside it; `read_json`,
`read_npy` and `read_npz` parse such a file, and a damaged one is a DataError naming it and
the step that writes it.

Checks for writers that cannot promise a complete file: `check_writable(folder)` probes an
output folder before long work; `check_raster` and `check_vector` read back what GDAL wrote
(on a full disk it can leave a truncated GeoTIFF or GeoPackage without raising). Failures
are `StorageError`s (exit 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import DataError, StorageError, os_error_cause
from .layout import remake_hint
from .tempnames import TEMP_PATTERN, final_path, temp_name_of


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(final: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed processes left beside `final`."""
    final = Path(final)
    removed: list[Path] = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_PATTERN.match(entry.name)
        if not m or m.group("name") != final.name or _alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# (root, action) of the `written_first` blocks that have not written under their root yet
_FIRST_WRITES: list[tuple[Path, Callable[[], object]]] = []


def _before_write(final: Path) -> None:
    """Run (once) the pending action of a `written_first` block whose root holds `final`."""
    where = final.absolute()
    for entry in list(_FIRST_WRITES):
        if where.is_relative_to(entry[0]):
            _FIRST_WRITES.remove(entry)  # first: the action's own write must not run it again
            entry[1]()


@contextlib.contextmanager
def written_first(root: str | Path, action: Callable[[], object]) -> Iterator[None]:
    """Run `action` right before the block's first write under `root` through this module
    (`temp_path`, `staged_dir` and the writers built on them), or at the block's end when it
    succeeded without writing there; not at all when it fails before writing there."""
    entry = (Path(root).absolute(), action)
    _FIRST_WRITES.append(entry)
    try:
        yield
    except BaseException:
        with contextlib.suppress(ValueError):
            _FIRST_WRITES.remove(entry)
        raise
    if entry in _FIRST_WRITES:
        _FIRST_WRITES.remove(entry)
        action()


@contextlib.contextmanager
def temp_path(final: str | Path) -> Iterator[Path]:
    """A temporary path beside `final`; renamed onto `final` when the block succeeds,
    removed when it raises (any exception, KeyboardInterrupt, SIGTERM). The parent folder
    is created. The writer inside the block must create the file at the given path."""
    final = Path(final)
    _before_write(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = temp_name_of(final, "tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        if exc.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (fsync'd before the rename)."""
    path = Path(path)
    with temp_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """`np.save` to exactly `path` (no '.npy' appended), atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """`np.savez` to exactly `path`, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub checks **arrays against allow_pickle
    return atomic_write_bytes(path, buf.getvalue())


# -- reading the engine's own files ----------------------------------------------------------
# never through a link, never blocking on a FIFO, bytes as they are (flags the OS lacks are 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | \
    getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def read_regular(folder: str | Path, name: str) -> bytes:
    """The bytes of the regular file `name` in `folder`, opened without following a symbolic
    link (`name` is one path component, so the file lies inside `folder`; the folder itself
    may be a link, as a run's shared teacher folder is). DataError naming the file when it
    is missing, a link, a folder or another non-regular file (a FIFO, a device)."""
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"{name!r} is not a file name")
    path = Path(folder) / name
    try:
        if os.path.islink(path):  # also where the OS has no O_NOFOLLOW (Windows)
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist", remake_hint(folder)) from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise DataError(f"{path} is a symbolic link; files of a run are read only as regular files "
                        "inside their folder", f"replace the link with the file, or {remake_hint(folder)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{path} is not a regular file", remake_hint(folder))
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _damaged(folder: str | Path, name: str, detail: str) -> DataError:
    return DataError(f"{Path(folder) / name} is damaged: {detail}", remake_hint(folder))


def read_json(folder: str | Path, name: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object in the file `name` of `folder` (read by `read_regular`), holding at
    least `keys`; DataError naming the file and the step that writes it when it is not."""
    try:
        doc = json.loads(read_regular(folder, name).decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError
        raise _damaged(folder, name, f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _damaged(folder, name, f"a JSON {type(doc).__name__}, not an object")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise _damaged(folder, name, f"it lacks {', '.join(missing)}")
    return doc


def read_npy(folder: str | Path, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The numeric array in the .npy file `name` of `folder` (no pickled objects), of `shape`
    when given; DataError naming the file and the step that writes it when it is not."""
    try:
        array = np.load(io.BytesIO(read_regular(folder, name)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise _damaged(folder, name, f"not a .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise _damaged(folder, name, "an archive of arrays, not one .npy array")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise _damaged(folder, name, f"an array of {array.dtype}, not of numbers")
    if shape is not None and array.shape != shape:
        raise _damaged(folder, name, f"an array of shape {array.shape}, not {shape}")
    return array


def read_npz(folder: str | Path, name: str, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays of the .npz file `name` of `folder` (no pickled objects), holding at least
    `keys`; DataError naming the file and the step that writes it when it is damaged."""
    try:
        data = np.load(io.BytesIO(read_regular(folder, name)), allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("one .npy array, not an archive of arrays")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile) as exc:
        raise _damaged(folder, name, f"not a .npz archive ({exc})") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise _damaged(folder, name, f"it lacks {', '.join(missing)}")
    return arrays


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV text with a header of `columns`; None is an empty cell."""
    import csv
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def check_writable(folder: str | Path, what: str = "output folder") -> None:
    """Fail now, before long work, when files cannot be created in `folder`: a StorageError
    naming the folder and the cause (read-only, a file in the path, permissions). Nothing
    is created: the nearest existing folder on the path is probed."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        probe = temp_name_of(existing / "probe", "tmp", keep_suffix=False)
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        cause = os_error_cause(exc)
        if cause is None:
            raise
        where = folder if existing == folder else f"{folder} ({existing})"
        raise StorageError(f"cannot write into the {what} {where}: {cause[0]}", cause[1]) from exc


def check_raster(path: str | Path, expected: np.ndarray | None = None) -> None:
    """Read a just-written raster back. GDAL's GeoTIFF writer reports a full disk or a
    file-size limit only on stderr and leaves a truncated file; this turns that into a
    StorageError. With `expected`, the pixels must equal it."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            data = src.read()
        ok = expected is None or np.array_equal(data, expected)
    except (RasterioError, OSError):
        ok = False
    if not ok:
        raise StorageError(f"{final_path(path)} was not written completely (the disk is full or a "
                           "file-size limit was reached)",
                           "free some space, raise the limit (ulimit -f) or write elsewhere, then run it again")


# GeoPackage 1.2: QGIS 3.22's GDAL (3.2-3.6) says "may only be partially supported" of a
# 1.4 file, which newer GDALs write by default.
GPKG_OPTIONS = {"VERSION": "1.2"}


def write_gpkg_layer(path: str | Path, geometry: np.ndarray | None, field_data: list, fields: list[str], *,
                     layer: str, crs: str | None = None, geometry_type: str | None = None, append: bool = False,
                     field_mask: list | None = None) -> None:
    """Write (or append to) one layer of a GeoPackage through pyogrio; a new file is a
    GeoPackage 1.2, which every supported QGIS opens without a warning."""
    from pyogrio.raw import write
    write(str(path), geometry, field_data, fields, field_mask=field_mask, layer=layer, driver="GPKG",
          geometry_type=geometry_type, crs=crs, append=append, dataset_options=None if append else GPKG_OPTIONS)


def check_vector(path: str | Path, layer: str, features: int) -> None:
    """Read a just-written vector layer's summary back: GDAL can leave a truncated
    GeoPackage on a full disk without an error. StorageError unless it holds `features`."""
    import pyogrio

    try:
        ok = pyogrio.read_info(str(path), layer=layer)["features"] == features
    except Exception:  # any read error of a file just written means it is incomplete
        ok = False
    if not ok:
        raise StorageError(f"{final_path(path)} was not written completely (the disk is full or a "
                           "file-size limit was reached)",
                           "free some space, raise the limit (ulimit -f) or write elsewhere, then run it again")


# -- folders -------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system cannot swap: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staged: str | Path, final: str | Path) -> None:
    """Put the finished folder `staged` at `final`, replacing what is there.

    Where the OS can (Linux), the two are swapped in one step, so a kill leaves the old
    folder or the new one; elsewhere there is a moment between two renames when `final` is
    missing (the old folder then survives as a hidden '.NAME.old-PID' beside it)."""
    staged, final = Path(staged), Path(final)
    if not final.exists():
        os.rename(staged, final)
        return
    if _exchange(staged, final):
        shutil.rmtree(staged)  # now holds the old folder
        return
    old = temp_name_of(final, "old", keep_suffix=False)
    os.rename(final, old)
    os.rename(staged, final)
    shutil.rmtree(old)


@contextlib.contextmanager
def staged_dir(final: str | Path,
               commit: Callable[[Path, Path], None] = replace_dir) -> Iterator[Path]:
    """A hidden empty folder beside `final` to build a whole folder in. When the block
    succeeds, `commit(stage, final)` puts it in place (default: `replace_dir`); when the
    block or the commit raises, what is left of the stage is removed."""
    final = Path(final)
    _before_write(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    stage = temp_name_of(final, "partial", keep_suffix=False)
    try:  # mkdir inside: a signal handled right after it must not leak the folder
        stage.mkdir()
        yield stage
        commit(stage, final)
    finally:
        _remove(stage)
