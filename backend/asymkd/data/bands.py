"""Band metadata: names, presets, and which bands are true-colour red, green and blue."""

from __future__ import annotations

from ..errors import DataError

SENTINEL2_EUROSAT = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10",
                     "B11", "B12", "B8A"]
SENTINEL2_ORDERED = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                     "B10", "B11", "B12"]
RGB = ["R", "G", "B"]

PRESETS = {"sentinel2": SENTINEL2_EUROSAT, "eurosat": SENTINEL2_EUROSAT,
           "sentinel2-ordered": SENTINEL2_ORDERED, "rgb": RGB}

# Central wavelengths (nm) of Sentinel-2 MSI bands, used to pick true-colour bands.
SENTINEL2_WAVELENGTH_NM = {"B01": 443, "B02": 490, "B03": 560, "B04": 665, "B05": 705,
                           "B06": 740, "B07": 783, "B08": 842, "B8A": 865, "B09": 945,
                           "B10": 1375, "B11": 1610, "B12": 2190}
_COLOUR_ALIASES = {"r": 665, "red": 665, "g": 560, "green": 560, "b": 490, "blue": 490,
                   "nir": 842, "coastal": 443, "swir1": 1610, "swir2": 2190}
TRUE_COLOUR_NM = {"R": 665, "G": 560, "B": 490}


def parse_band_names(spec: str | list[str] | None, count: int) -> list[str] | None:
    """Band names from a preset name, a comma list, or a list; None when not given."""
    if spec is None:
        return None
    names = PRESETS.get(spec.lower(), None) if isinstance(spec, str) else list(spec)
    if names is None:
        names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if len(names) != count:
        given = spec if isinstance(spec, str) else ",".join(names)
        raise DataError(f"the band names given (--bands or data.bands: {given}) "
                        f"are {len(names)} but the data has {count} bands",
                        f"give exactly {count} comma-separated names or a preset: {', '.join(PRESETS)}")
    return names


def default_band_names(count: int) -> list[str]:
    if count == 3:
        return list(RGB)
    if count == 13:
        return list(SENTINEL2_EUROSAT)
    return [f"band{i + 1}" for i in range(count)]


def wavelength_nm(name: str) -> float | None:
    """Central wavelength of a band from its name (Sentinel-2 names, colour words, '665nm')."""
    key = name.strip()
    upper = key.upper()
    if upper in SENTINEL2_WAVELENGTH_NM:
        return float(SENTINEL2_WAVELENGTH_NM[upper])
    if len(upper) == 2 and upper[0] == "B" and upper[1].isdigit():  # B2 -> B02
        return wavelength_nm(f"B0{upper[1]}")
    if key.lower() in _COLOUR_ALIASES:
        return float(_COLOUR_ALIASES[key.lower()])
    digits = key.lower().removesuffix("nm")
    try:
        value = float(digits)
    except ValueError:
        return None
    return value if 300 <= value <= 3000 else None


def true_colour_indices(band_names: list[str]) -> tuple[int, int, int]:
    """Indices of the bands closest to red, green and blue (within 40 nm), from metadata."""
    waves = [wavelength_nm(n) for n in band_names]
    picked = []
    for colour, target in TRUE_COLOUR_NM.items():
        best = min((abs(w - target), i) for i, w in enumerate(waves) if w is not None) \
            if any(w is not None for w in waves) else None
        if best is None or best[0] > 40:
            raise DataError(
                f"cannot tell which MS band is {colour} (true colour) from band names {band_names}",
                "name the bands with --bands (e.g. --bands sentinel2, or B01,B02,...) so a "
                "pseudo-RGB can be rendered, or give explicit same-target pairs")
        picked.append(best[1])
    return picked[0], picked[1], picked[2]
