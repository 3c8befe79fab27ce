"""Class colours: a fixed colour per EuroSAT class and a stable colour for any other name,
and the one parser of colour values.

The same name always gets the same colour (across runs, machines and Python versions), so a
classified layer, its QML style, the exported model and the report agree without passing
colours around.
"""

from __future__ import annotations

import colorsys
import hashlib
from typing import Any, Sequence

# Land-cover-like colours, distinct from each other on a map.
EUROSAT_COLORS: dict[str, str] = {
    "AnnualCrop": "#f0c84b",
    "Forest": "#1a7a32",
    "HerbaceousVegetation": "#9ccc65",
    "Highway": "#8c8c8c",
    "Industrial": "#8e44ad",
    "Pasture": "#d9ef8b",
    "PermanentCrop": "#e67e22",
    "Residential": "#e74c3c",
    "River": "#3498db",
    "SeaLake": "#1f3a93",
}

_GOLDEN = 0.618033988749895


def _hashed_color(name: str) -> str:
    """A saturated colour from a stable hash of the name (Python's hash() is salted)."""
    digest = hashlib.sha256(name.strip().lower().encode("utf-8")).digest()
    hue = (int.from_bytes(digest[:4], "big") / 2**32 + _GOLDEN) % 1.0
    saturation = 0.55 + 0.3 * digest[4] / 255
    value = 0.7 + 0.25 * digest[5] / 255
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))


def class_color(name: str) -> str:
    """Hex colour (#rrggbb) of a class: the EuroSAT palette, else a stable hashed colour."""
    if name in EUROSAT_COLORS:
        return EUROSAT_COLORS[name]
    for known, color in EUROSAT_COLORS.items():  # tolerate case and spacing variants
        if known.lower() == name.strip().lower().replace(" ", ""):
            return color
    return _hashed_color(name)


def normalize_color(value: Any) -> str | None:
    """'#rrggbb' from '#rgb', '#rrggbb', 'rrggbb', '#rrggbbaa' or an (r, g, b[, a]) sequence
    (0..255, or 0..1 floats as matplotlib writes them); None if the value is no colour."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) == 3:
            text = "".join(c * 2 for c in text)
        if len(text) in (6, 8) and all(c in "0123456789abcdefABCDEF" for c in text):
            return "#" + text[:6].lower()
        return None
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        try:
            vals = [float(v) for v in value[:3]]
        except (TypeError, ValueError):
            return None
        if all(0 <= v <= 1 for v in vals) and any(isinstance(v, float) for v in value[:3]):
            vals = [v * 255 for v in vals]
        return "#" + "".join(f"{int(round(min(max(v, 0), 255))):02x}" for v in vals)
    return None


def is_hex_color(value: Any) -> bool:
    """True for exactly '#rrggbb' (either case), the form stored in model files."""
    return isinstance(value, str) and normalize_color(value) == value.lower()


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """A colour (see normalize_color) -> (r, g, b) in 0..255."""
    text = normalize_color(color)
    if text is None:
        raise ValueError(f"not a #rrggbb colour: {color!r}")
    return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)


def class_colors(names: Sequence[str], given: Any = None) -> list[str]:
    """One '#rrggbb' per class name: the given colour (a list in name order, or name -> colour)
    where it is a usable colour, else the name's class_color."""
    if isinstance(given, (list, tuple)):
        given = dict(zip(names, given, strict=False))  # a shorter list colours the first classes
    chosen = given if isinstance(given, dict) else {}
    return [normalize_color(chosen.get(name)) or class_color(name) for name in names]
