"""The raster's values against the model's training data, checked on a sample before the job.

A model learns the units of its training bands (8-bit RGB: means around 50-150); a raster
in other units (reflectance 0..1 or 0..10000) is classified as garbage, often one class
everywhere, with no error. A few hundred small windows spread over the raster are read
(cheap, whatever its size) and each band's range compared with the training mean and std:
a clear mismatch is refused naming `--scale` (pixels are multiplied by it before the model)
and the band's real range; a doubtful one is a warning.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from rasterio.windows import Window

from ..errors import DataError
from ..models.metadata import ModelMeta

SAMPLE_GRID = 16     # windows along each axis: 256 windows
SAMPLE_WINDOW = 16   # pixels per window side
MIN_PIXELS = 64      # fewer valid sampled pixels: nothing to judge


def sample(src, bands: Sequence[int]) -> np.ndarray | None:
    """(bands, n) valid pixel values from windows spread over the raster (float64)."""
    w, h = min(SAMPLE_WINDOW, src.width), min(SAMPLE_WINDOW, src.height)
    cols = np.unique(np.linspace(0, src.width - w, min(SAMPLE_GRID, src.width // w or 1)).astype(int))
    rows = np.unique(np.linspace(0, src.height - h, min(SAMPLE_GRID, src.height // h or 1)).astype(int))
    parts = []
    for r in rows.tolist():
        for c in cols.tolist():
            data = src.read(list(bands), window=Window(c, r, w, h), masked=True)
            values = np.ma.getdata(data).reshape(len(bands), -1).astype(np.float64)
            ok = ~np.ma.getmaskarray(data).reshape(len(bands), -1).any(axis=0) & np.isfinite(values).all(axis=0)
            parts.append(values[:, ok])
    values = np.concatenate(parts, axis=1) if parts else np.zeros((len(bands), 0))
    return values if values.shape[1] >= MIN_PIXELS else None


def check(values: np.ndarray | None, meta: ModelMeta, bands: Sequence[int], dtypes: Sequence[str], scale: float,
          warn: Callable[[str], None]) -> None:
    """Refuse a clear mismatch of the (scaled) sample with the training statistics; warn on a
    doubtful one."""
    mean = np.asarray(meta.mean, np.float64)
    std = np.asarray(meta.std, np.float64)
    if values is None or len(mean) != len(values) or len(std) != len(values):
        return
    values = values * scale
    names = list(meta.band_names)
    doubtful = []
    for i, band in enumerate(bands):
        v, m, s = values[i], float(mean[i]), float(std[i])
        p1, p99, avg, top = (float(x) for x in (*np.percentile(v, [1, 99]), v.mean(), v.max()))
        name = names[i] if i < len(names) else str(i + 1)
        seen = (f"raster band {band} (the model's {name}) holds {p1:.3g}..{p99:.3g} (1st..99th percentile, "
                f"mean {avg:.3g}{f', after --scale {scale:g}' if scale != 1 else ''})")
        trained = f"the model was trained on values around {m:.3g} (std {s:.3g})"
        unit = np.issubdtype(np.dtype(dtypes[i]), np.floating) and p1 >= 0 and 0 < top <= 1.0 and m > 10
        if unit or p99 < m - 3 * s or p99 > max(m + 10 * s, 2 * (m + 3 * s)):
            factor = 255.0 if unit and m + 3 * s <= 300 else _round(m / avg) if avg > 0 else None
            how = (f"give --scale {factor:g} to multiply the pixels first" if factor else
                   "rescale the raster to the training data's units")
            raise DataError(f"{seen} but {trained}: the raster's values are in other units",
                            f"{how} (e.g. 255 for 0..1 reflectance fed to an 8-bit model), or check --bands")
        if abs(avg - m) > 3 * s:
            doubtful.append(f"{seen}, far from the training data's {m:.3g} (std {s:.3g})")
    if doubtful:
        warn("; ".join(doubtful) + ": check --bands and the raster's value scaling (--scale)")


def _round(x: float) -> float:
    """`x` to two significant digits."""
    if not math.isfinite(x) or x <= 0:
        return 0.0
    digits = 1 - int(math.floor(math.log10(x)))
    return round(x, digits)
