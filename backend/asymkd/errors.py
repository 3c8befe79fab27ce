"""User-facing errors: each says what is wrong and how to fix it."""

from __future__ import annotations

import errno

from .tempnames import final_path  # temporary names stand for the file being written


class AsymKDError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class DataError(AsymKDError):
    """Bad or missing data: folders, images, labels, bands."""


class ConfigError(AsymKDError):
    """Bad configuration: unknown keys, out-of-range values, unknown model names."""


class ModelFileError(AsymKDError):
    """A checkpoint or model file that cannot be used with the given data."""


class Cancelled(AsymKDError):
    """The job was cancelled (Ctrl-C, SIGTERM)."""


class StorageError(AsymKDError):
    """The file system refused a read or write: disk full, file-size limit, read-only or
    permission denied, a file where a folder is needed (an environment fault, exit 2)."""


_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free some space or write to another disk, then run it again"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or write to another disk, then run it again"),
    errno.EFBIG: ("the file would exceed the file-size limit", "raise the limit (ulimit -f) or write to "
                  "another file system"),
    errno.EROFS: ("the file system is read-only", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path: give a folder where "
                    "a folder is expected"),
    errno.EISDIR: ("the path is a folder, not a file", "give a file name, not a folder"),
    errno.ENOENT: ("no such file or folder", "check the path (its folder must exist)"),
    errno.EEXIST: ("it already exists (a file where a folder is needed?)", "remove it or choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("input/output error", "check the disk or network drive"),
    errno.EPIPE: ("the reader of the output stream went away", "keep the reading end open until the command ends"),
    -1: ("the write did not complete", "check the free space and the file-size limit, then run it again"),
}
# Library errors (GDAL, SQLite, safetensors, torch) that only say in words which OS error
# stopped a write.
_WORDS = (("no space left", errno.ENOSPC), ("disk is full", errno.ENOSPC), ("storagefull", errno.ENOSPC),
          ("file too large", errno.EFBIG), ("filetoolarge", errno.EFBIG), ("quota exceeded", errno.EDQUOT),
          ("read-only file system", errno.EROFS), ("permission denied", errno.EACCES),
          ("file write failed", -1), ("failed writing file", -1), ("disk i/o error", -1),
          ("unexpected pos", -1))  # torch.save's zip writer cut short


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def os_error_cause(exc: BaseException) -> tuple[str, str] | None:
    """(cause, hint) in plain words for an OS error in `exc` or its chain, else None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return _CAUSES[e.errno]
    return None


def storage_error(exc: BaseException) -> StorageError | None:
    """The StorageError an OSError (or a library error wrapping one) stands for, naming the
    path and the cause; None when `exc` is not a file-system fault."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _CAUSES:
            cause, hint = _CAUSES[e.errno]
            where = final_path(e.filename) if e.filename is not None else \
                "the output stream" if e.errno == errno.EPIPE else "a file"
            if e.filename2 is not None:
                where += f" -> {final_path(e.filename2)}"
            return StorageError(f"cannot write or read {where}: {cause}", hint)
    for e in _chain(exc):
        text = str(e)
        code = next((c for words, c in _WORDS if words in text.lower()), None)
        if code is not None:
            cause, hint = _CAUSES[code]
            short = text if len(text) <= 300 else text[:297] + "..."
            return StorageError(f"a write failed: {cause} ({short})", hint)
    return None
