"""A stand-in engine for plugin tests: same CLI entry point and event protocol as the real one."""

__version__ = "0.0.0-fake"
