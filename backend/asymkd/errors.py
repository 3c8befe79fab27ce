"""User-facing errors: each says what is wrong and how to fix it."""

from __future__ import annotations


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
