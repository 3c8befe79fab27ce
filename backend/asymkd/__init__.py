"""AsymKD: an MS teacher teaches an RGB student without same-target RGB/MS pairs."""

__version__ = "0.1.0"
