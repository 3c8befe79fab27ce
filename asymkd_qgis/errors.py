"""The plugin's own error for bad input, kept free of Qt so that the runner can tell it apart."""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user; the message is meant for the message bar as is."""
