"""The AsymKD Processing provider and its algorithms."""

from .provider import AsymKDProvider

__all__ = ["AsymKDProvider"]
