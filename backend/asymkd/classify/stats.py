"""What a classification says beyond each tile's class: which tiles are uncertain, and how
many tiles and hectares each class covers.

Uncertainty (`--uncertain-below T --uncertain-by M`) marks a tile whose certainty is below
T; the measures (names in choices.UNCERTAINTY_MEASURES):

    confidence   the best class's probability < T
    margin       best probability - second probability < T
    entropy      normalised entropy > 1 - T (that is, 1 - entropy < T)

Area statistics are accumulated per tile while the tiles are written (memory stays flat):
each tile's area on the ellipsoid of the grid's CRS, summed per class. The tile's outline is
densified (EDGE_POINTS per edge), taken to the CRS's geographic coordinates and measured in the
ellipsoid's cylindrical equal-area projection, where areas are the ellipsoid's; the short edges
make this the geodesic polygon's area within 1e-9 for tiles up to 640 m (1e-7 for 6.4 km tiles
at 70 degrees north), vectorised over all tiles of a batch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .. import choices

if TYPE_CHECKING:  # a type only: infer's Summary is what the measures read
    from .infer import Summary

AREAS_LAYER = "class_areas"
AREA_COLUMNS = ("class_id", "class_name", "tiles", "hectares", "share", "mean_confidence", "uncertain_tiles")
EDGE_POINTS = 4  # vertices per tile edge: the tile's straight edges in its CRS, followed on the ellipsoid

# measure name -> which tiles are uncertain at threshold t (1 = uncertain)
_UNCERTAIN: dict[str, Callable[[Summary, float], np.ndarray]] = {
    "confidence": lambda s, t: s.confidence < t,
    "margin": lambda s, t: (s.confidence - s.second_prob) < t,
    "entropy": lambda s, t: s.entropy > 1.0 - t,
}


@dataclasses.dataclass(frozen=True)
class Uncertainty:
    """Which tiles are marked `uncertain`: none without a threshold."""
    below: float | None = None
    by: str = "confidence"

    def check(self) -> None:
        from ..errors import ConfigError
        if self.below is not None and not (math.isfinite(self.below) and 0.0 <= self.below <= 1.0):
            raise ConfigError(f"--uncertain-below {self.below} must be between 0 and 1",
                              "e.g. --uncertain-below 0.6 marks tiles whose certainty is below 0.6")
        choices.check("--uncertain-by", self.by, choices.UNCERTAINTY_MEASURES)

    def flags(self, summary: Summary) -> np.ndarray:
        """1 where a tile is uncertain, else 0 (int32, one per tile)."""
        if self.below is None:
            return np.zeros(len(summary.class_id), np.int32)
        return _UNCERTAIN[self.by](summary, float(self.below)).astype(np.int32)


class Ellipsoid:
    """Areas on the ellipsoid of a CRS's datum (WGS84 where the CRS names none), for
    coordinates given in that CRS: the one area rule of tiles and regions."""

    def __init__(self, crs: Any):
        from pyproj import CRS, Geod, Transformer
        pcrs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
        geod = pcrs.get_geod() or Geod(ellps="WGS84")
        self.a, self.es = float(geod.a), float(geod.es)
        self._to_lonlat = (None if pcrs.is_geographic
                           else Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True))

    def lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of the CRS as longitude, latitude (arrays of any shape)."""
        if self._to_lonlat is None:
            return x, y
        lon, lat = self._to_lonlat.transform(x, y)
        return np.asarray(lon), np.asarray(lat)

    def _authalic_y(self, lat_deg: np.ndarray) -> np.ndarray:
        """The equal-area projection's y / a: q(latitude) / 2 (sin(latitude) on a sphere)."""
        s = np.sin(np.radians(lat_deg))
        if self.es == 0.0:
            return s
        e = math.sqrt(self.es)
        return (1.0 - self.es) * (s / (1.0 - self.es * s * s) - np.log((1.0 - e * s) / (1.0 + e * s)) / (2.0 * e)) / 2

    def rings_m2(self, lon: np.ndarray, lat: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Signed areas (m^2, counter-clockwise positive) of rings stored one after another:
        ring i is vertices ends[i] .. ends[i+1]-1 of `lon`, `lat` (closed or not). Each ring is
        taken relative to its first vertex (no loss of precision far from the origin, and a
        ring across the antimeridian keeps its shape)."""
        lon, lat, ends = np.asarray(lon, np.float64), np.asarray(lat, np.float64), np.asarray(ends, np.int64)
        counts = np.diff(ends)
        ring = np.repeat(np.arange(len(counts)), counts)
        first = ends[:-1][ring]
        dlon = np.radians((lon - lon[first] + 180.0) % 360.0 - 180.0)
        y = self._authalic_y(lat)
        x, y = self.a * dlon, self.a * (y - y[first])
        nxt = np.arange(1, len(lon) + 1)
        nxt[ends[1:][counts > 0] - 1] = ends[:-1][counts > 0]  # the last vertex closes its ring
        cross = x * y[nxt] - x[nxt] * y
        return 0.5 * np.bincount(ring, weights=cross, minlength=len(counts))


class ClassAreas:
    """Tiles, hectares, confidence and uncertain tiles per class, added batch by batch."""

    def __init__(self, crs: Any, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self._ellipsoid = Ellipsoid(crs)
        k = len(self.class_names)
        self.tiles = np.zeros(k, np.int64)
        self.m2 = np.zeros(k, np.float64)
        self.confidence = np.zeros(k, np.float64)
        self.uncertain = np.zeros(k, np.int64)

    def add(self, bounds: Sequence[np.ndarray], class_id: np.ndarray, confidence: np.ndarray,
            uncertain: np.ndarray) -> None:
        if len(class_id) == 0:
            return
        k = len(self.class_names)
        cid = np.asarray(class_id, np.int64)
        self.tiles += np.bincount(cid, minlength=k)
        self.m2 += np.bincount(cid, weights=self.tile_areas_m2(*bounds), minlength=k)
        self.confidence += np.bincount(cid, weights=np.asarray(confidence, np.float64), minlength=k)
        self.uncertain += np.bincount(cid[np.asarray(uncertain) != 0], minlength=k)

    def tile_areas_m2(self, minx: np.ndarray, miny: np.ndarray, maxx: np.ndarray, maxy: np.ndarray) -> np.ndarray:
        """Ellipsoidal area (m^2) of each box (in the CRS's coordinates)."""
        xs, ys = self._ellipsoid.lonlat(*_outlines(np.asarray(minx), np.asarray(miny), np.asarray(maxx),
                                                     np.asarray(maxy)))
        n, m = xs.shape
        return np.abs(self._ellipsoid.rings_m2(xs.ravel(), ys.ravel(), np.arange(n + 1) * m))

    def table(self) -> list[dict[str, Any]]:
        """One row per class of the model (AREA_COLUMNS); share is of the classified area."""
        total = float(self.m2.sum())
        return [{"class_id": i, "class_name": name, "tiles": int(self.tiles[i]), "hectares": float(self.m2[i]) / 1e4,
                 "share": float(self.m2[i]) / total if total > 0 else 0.0,
                 "mean_confidence": float(self.confidence[i] / self.tiles[i]) if self.tiles[i] else None,
                 "uncertain_tiles": int(self.uncertain[i])}
                for i, name in enumerate(self.class_names)]


def _outlines(minx: np.ndarray, miny: np.ndarray, maxx: np.ndarray,
              maxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boxes' rings (counter-clockwise), EDGE_POINTS vertices per edge: (n, 4 * EDGE_POINTS)."""
    f = np.arange(EDGE_POINTS) / EDGE_POINTS
    w, h = (maxx - minx)[:, None], (maxy - miny)[:, None]
    x0, y0 = minx[:, None], miny[:, None]
    xs = np.concatenate([x0 + f * w, x0 + w + 0 * f, x0 + w - f * w, x0 + 0 * f], axis=1)
    ys = np.concatenate([y0 + 0 * f, y0 + f * h, y0 + h + 0 * f, y0 + h - f * h], axis=1)
    return xs, ys


def write_area_table(gpkg: Path, table: list[dict[str, Any]]) -> None:
    """The table as the non-spatial layer `class_areas` of the GeoPackage (mean_confidence NULL
    for a class without tiles)."""
    from ..fileio import check_vector, write_gpkg_layer
    dtypes: dict[str, Any] = {"class_id": np.int32, "class_name": object, "tiles": np.int64, "hectares": np.float64,
                              "share": np.float64, "mean_confidence": np.float64, "uncertain_tiles": np.int64}
    data = [np.array([np.nan if row[c] is None else row[c] for row in table], dtype=dtypes[c])
            for c in AREA_COLUMNS]
    write_gpkg_layer(gpkg, None, data, list(AREA_COLUMNS), layer=AREAS_LAYER, append=True)
    check_vector(gpkg, AREAS_LAYER, len(table))


def area_csv_text(table: list[dict[str, Any]]) -> str:
    """The table as CSV (an empty mean_confidence for a class without tiles)."""
    from ..fileio import csv_text
    return csv_text(table, AREA_COLUMNS)


def areas_csv_path(gpkg: Path) -> Path:
    """Where the CSV goes: `<gpkg stem>_areas.csv` beside the GeoPackage."""
    return gpkg.with_name(f"{gpkg.stem}_areas.csv")
