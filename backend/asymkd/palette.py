"""Class colours: a fixed colour per EuroSAT class and a stable colour for any other name.

The same name always gets the same colour (across runs, machines and Python versions), so a
classified layer, its QML style and the report agree without passing colours around.
"""

from __future__ import annotations

import colorsys
import hashlib

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


def class_colors(names: list[str]) -> dict[str, str]:
    """Colour per class name, in the given order."""
    return {n: class_color(n) for n in names}


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' -> (r, g, b) in 0..255."""
    text = color.lstrip("#")
    if len(text) != 6:
        raise ValueError(f"not a #rrggbb colour: {color!r}")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
