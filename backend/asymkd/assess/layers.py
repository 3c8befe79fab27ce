"""The GeoPackages of `asymkd sample` and `asymkd assess`: the classified tiles they read, the
sample they write (and read back, labeled), any other reference layer, and the assessment
table.

A sample GeoPackage holds the layer `sample` (the sampled tile polygons with `sample_id`,
`map_class`, `tile_key`, `stratum_weight` = the class's share of the mapped area,
`sampling_weight` = tiles of the class per sampled tile, and an empty `reference` to fill),
the table `sample_strata` (per map class: tiles, mapped area, weight, sample size), from
which `assess` reads the strata back, and the table `sample_info` (design, seed, source).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.mapchips import class_text
from ..errors import DataError
from ..events import Events
from ..fileio import check_vector, write_gpkg_layer
from .estimate import ROW_COLUMNS
from .sampling import SampleDesign

TILES_LAYER = "tiles"  # classify.writer.LAYER, spelt here so reading needs no classify import
CLASS_FIELD = "class_name"
KEY_FIELD = "tile_key"
SAMPLE_LAYER = "sample"
STRATA_TABLE = "sample_strata"
INFO_TABLE = "sample_info"
ASSESSMENT_TABLE = "assessment"
REFERENCE_FIELD = "reference"
STRATA_COLUMNS = ("map_class", "tiles", "mapped_area", "area_unit", "weight", "sample_size")

_VECTOR_HINT = "give a vector file GDAL can open (GeoPackage, shapefile, GeoJSON...)"


@dataclasses.dataclass
class Tiles:
    """The classified tiles that have a class: their class, key, polygon and area."""
    path: Path
    layer: str
    crs: str | None
    classes: tuple[str, ...]       # map classes present, in the model's order where class ids say it
    map_class: np.ndarray          # class name per tile
    keys: np.ndarray               # tile_key per tile (the feature id where the layer has none)
    geoms: np.ndarray              # tile polygons
    areas: np.ndarray              # area per tile, in `area_unit`
    area_unit: str                 # "ha", or "tiles" for a layer without a CRS
    skipped: int                   # tiles without a class (not part of the map's strata)
    class_ids: dict[str, str]      # class id (as text) -> class name, where the layer has class_id

    def mapped_areas(self) -> dict[str, float]:
        return {c: float(self.areas[self.map_class == c].sum()) for c in self.classes}

    def mapped_tiles(self) -> dict[str, int]:
        return {c: int(np.count_nonzero(self.map_class == c)) for c in self.classes}


@dataclasses.dataclass
class Reference:
    """Reference labels: from a sample of `sample` (tile keys, recorded map classes and
    design) or from any point/polygon layer (geometries in the tiles' CRS)."""
    path: Path
    layer: str
    field: str
    labels: np.ndarray                     # class text per feature, None where unlabeled
    geoms: np.ndarray                      # in the tiles' CRS; None where missing or not reprojectable
    keys: np.ndarray | None = None         # sample only: tile_key per feature
    map_class: np.ndarray | None = None    # sample only: map class recorded when drawn
    design: SampleDesign | None = None     # sample only
    area_unit: str = "ha"                  # sample only: unit of the design's mapped areas

    @property
    def is_sample(self) -> bool:
        return self.design is not None


# -- reading ---------------------------------------------------------------------------------
def _layers(path: Path, what: str) -> list[tuple[str, str | None]]:
    """(name, geometry type or None for a table) of every layer of a vector file."""
    import pyogrio
    if not path.exists():
        raise DataError(f"{what} {path} does not exist", _VECTOR_HINT)
    try:
        return [(str(n), None if g is None else str(g)) for n, g in pyogrio.list_layers(str(path))]
    except Exception as exc:  # pyogrio's DataSourceError and GDAL errors on a file that is not vector data
        raise DataError(f"cannot read {what} {path}: {exc}", _VECTOR_HINT) from exc


def _read(path: Path, layer: str, columns: list[str], what: str,
          geometry: bool = True) -> tuple[dict, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """A layer's CRS and other metadata, feature ids, WKB geometries and the named columns
    (by name: GDAL returns them in the layer's order, not the order asked)."""
    from pyogrio.raw import read
    try:
        info, fids, wkb, values = read(str(path), layer=layer, columns=columns, return_fids=True,
                                       read_geometry=geometry)
    except Exception as exc:  # GDAL errors on a broken layer
        raise DataError(f"cannot read {what} {path} (layer '{layer}'): {exc}",
                        "check the file in QGIS, or save the layer again as a GeoPackage") from exc
    return info, np.asarray(fids), wkb, dict(zip((str(f) for f in info["fields"]), values, strict=True))


def read_tiles(path: str | Path, layer: str | None = None, events: Events | None = None) -> Tiles:
    """The tiles layer of a classify output; tiles without a class are left out."""
    import shapely
    path = Path(path)
    layers = [n for n, _ in _layers(path, "tiles file")]
    name = layer or TILES_LAYER
    if name not in layers:
        raise DataError(f"{path} has no layer '{name}'; its layers are: {', '.join(layers) or '(none)'}",
                        "give the GeoPackage written by `asymkd classify`, or name its tile layer with --layer")
    import pyogrio
    fields = [str(f) for f in pyogrio.read_info(str(path), layer=name)["fields"]]
    if CLASS_FIELD not in fields:
        raise DataError(f"layer '{name}' of {path} has no field '{CLASS_FIELD}'; its fields are: "
                        f"{', '.join(fields) or '(none)'}", "give the tile layer written by `asymkd classify`")
    columns = [CLASS_FIELD] + [f for f in (KEY_FIELD, "class_id") if f in fields]
    info, fids, wkb, data = _read(path, name, columns, "tiles file")
    geoms = shapely.from_wkb(wkb) if wkb is not None and len(wkb) else np.full(len(fids), None, object)
    classes = np.array([class_text(v) for v in data[CLASS_FIELD]], dtype=object)
    keep = (classes != None) & ~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)  # noqa: E711
    keys = (np.array([str(k) for k in data[KEY_FIELD]], dtype=object) if KEY_FIELD in data
            else np.array([str(f) for f in fids], dtype=object))
    ids = _ids(data.get("class_id"))
    kept_ids = None if ids is None else ids[keep]
    tiles = Tiles(path=path, layer=name, crs=info.get("crs") or None, classes=_class_order(classes[keep], kept_ids),
                  map_class=classes[keep], keys=keys[keep], geoms=geoms[keep], areas=np.zeros(0), area_unit="ha",
                  skipped=int((~keep).sum()), class_ids=_class_ids(classes[keep], kept_ids))
    tiles.areas, tiles.area_unit = _tile_areas(tiles.geoms, tiles.crs)
    if tiles.crs is None and events is not None:
        events.warning(f"tiles {path} have no CRS: classes are weighted by their number of tiles, not hectares")
    return tiles


def _ids(values: np.ndarray | None) -> np.ndarray | None:
    """Class ids as floats, NaN where NULL (a layer edited by hand may have some)."""
    if values is None:
        return None
    return np.array([np.nan if v is None or np.ma.is_masked(v) else float(v) for v in values], np.float64)


def _class_order(classes: np.ndarray, ids: np.ndarray | None) -> tuple[str, ...]:
    """The map classes present, by class id (the model's order) where the layer has one."""
    names = sorted({str(c) for c in classes})
    if ids is None:
        return tuple(names)
    first = {n: float(np.nanmin(ids[classes == n], initial=np.inf)) for n in names}
    return tuple(sorted(names, key=lambda n: (first[n], n)))


def _class_ids(classes: np.ndarray, ids: np.ndarray | None) -> dict[str, str]:
    """Class id (as text) -> class name, for reading reference labels given as ids."""
    if ids is None:
        return {}
    return {str(int(i)): str(c) for i, c in zip(ids, classes, strict=True) if np.isfinite(i)}


def _tile_areas(geoms: np.ndarray, crs: str | None) -> tuple[np.ndarray, str]:
    """Each tile's ellipsoidal area in hectares (the rule of classify's area table), or 1
    per tile where there is no CRS to measure in."""
    import shapely
    if crs is None or len(geoms) == 0:
        return np.ones(len(geoms)), ("tiles" if crs is None else "ha")
    from ..classify.stats import ClassAreas
    minx, miny, maxx, maxy = shapely.bounds(geoms).T  # tiles are boxes in their CRS
    return ClassAreas(crs, []).tile_areas_m2(minx, miny, maxx, maxy) / 1e4, "ha"


def _pick_layer(path: Path, layers: list[tuple[str, str | None]], layer: str | None, events: Events) -> str:
    names = [n for n, _ in layers]
    if layer is not None:
        if layer not in names:
            raise DataError(f"reference {path} has no layer '{layer}'; its layers are: {', '.join(names)}",
                            "choose one of them with --reference-layer")
        return layer
    if SAMPLE_LAYER in names:
        return SAMPLE_LAYER
    spatial = [n for n, g in layers if g is not None]
    if not spatial:
        raise DataError(f"reference {path} has no point or polygon layer", _VECTOR_HINT)
    if len(spatial) > 1:
        events.warning(f"reference {path} has layers {spatial}; using '{spatial[0]}' (choose with --reference-layer)")
    return spatial[0]


def read_reference(path: str | Path, field: str, tiles: Tiles, layer: str | None, events: Events) -> Reference:
    """The reference labels of a layer, in the tiles' CRS; a sample written by `sample` is
    recognised by its layer and strata table and read by tile key."""
    import pyogrio
    path = Path(path)
    layers = _layers(path, "reference")
    name = _pick_layer(path, layers, layer, events)
    info = pyogrio.read_info(str(path), layer=name)
    fields = [str(f) for f in info["fields"]]
    if field not in fields:
        raise DataError(f"reference field '{field}' is not in {path} (layer '{name}'); its fields are: "
                        f"{', '.join(fields) or '(none)'}", "choose the reference class field with --field")
    if int(info["features"]) == 0:
        raise DataError(f"reference layer '{name}' of {path} is empty",
                        "give a layer with labeled points or polygons, e.g. a sample from `asymkd sample`")
    is_sample = (name == SAMPLE_LAYER and STRATA_TABLE in {n for n, _ in layers}
                 and {"map_class", KEY_FIELD} <= set(fields))
    columns = [field] + (["map_class", KEY_FIELD] if is_sample else [])
    info, _, wkb, data = _read(path, name, list(dict.fromkeys(columns)), "reference", geometry=not is_sample)
    labels = np.array([class_text(v) for v in data[field]], dtype=object)
    if is_sample:
        design, unit = read_design(path)
        return Reference(path=path, layer=name, field=field, labels=labels, geoms=np.full(len(labels), None, object),
                         keys=np.array([str(k) for k in data[KEY_FIELD]], dtype=object),
                         map_class=np.array([class_text(v) for v in data["map_class"]], dtype=object),
                         design=design, area_unit=unit)
    geoms = _reproject(wkb, info.get("crs") or None, tiles.crs, path, events)
    return Reference(path=path, layer=name, field=field, labels=labels, geoms=geoms)


def _reproject(wkb: np.ndarray | None, src: str | None, dst: str | None, path: Path, events: Events) -> np.ndarray:
    """Geometries from WKB, taken from `src` to `dst`; a missing CRS is taken to be the tiles'.
    Points that do not map (outside the target CRS's domain) come back None."""
    import shapely
    if wkb is None or len(wkb) == 0:
        return np.array([], dtype=object)
    geoms = shapely.from_wkb(wkb)
    if src is None or dst is None:
        if src is None and dst is not None:
            events.warning(f"reference {path} has no CRS; assuming the tiles' ({dst})")
        return geoms
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError, ProjError
    try:
        source, target = CRS.from_user_input(src), CRS.from_user_input(dst)
        if source == target:
            return geoms
        tf = Transformer.from_crs(source, target, always_xy=True)
    except (CRSError, ProjError) as exc:
        raise DataError(f"cannot reproject reference {path} to the tiles' CRS: {exc}",
                        "save the reference layer in the tiles' CRS (QGIS: Export > Save Features As)") from exc
    out = shapely.transform(geoms, lambda xy: np.column_stack(tf.transform(xy[:, 0], xy[:, 1], errcheck=False)))
    finite = np.array([g is not None and bool(np.all(np.isfinite(shapely.get_coordinates(g)))) for g in out])
    out = np.asarray(out, dtype=object)
    out[~finite] = None
    return out


def read_design(path: str | Path) -> tuple[SampleDesign, str]:
    """The design a sample GeoPackage was drawn with (its strata and info tables), and the
    unit of its mapped areas."""
    path = Path(path)
    _, _, _, strata = _read(path, STRATA_TABLE, list(STRATA_COLUMNS), "sample", geometry=False)
    info: dict[str, str] = {}
    if INFO_TABLE in {n for n, _ in _layers(path, "sample")}:
        _, _, _, kv = _read(path, INFO_TABLE, ["key", "value"], "sample", geometry=False)
        info = {str(k): str(v) for k, v in zip(kv["key"], kv["value"], strict=True)}
    design = SampleDesign(design=info.get("design", "stratified"), seed=int(info.get("seed", 0)),
                          n=int(np.sum(strata["sample_size"])), min_per_class=int(info.get("min_per_class", 0)),
                          classes=tuple(str(c) for c in strata["map_class"]),
                          tiles=tuple(int(t) for t in strata["tiles"]),
                          areas=tuple(float(a) for a in strata["mapped_area"]),
                          sizes=tuple(int(s) for s in strata["sample_size"]))
    unit = str(strata["area_unit"][0]) if len(strata["area_unit"]) else "ha"
    return design, unit


# -- joining and labels --------------------------------------------------------------------------
def tile_of_features(tiles: Tiles, geoms: np.ndarray) -> np.ndarray:
    """Index of the tile holding each feature's point (a polygon's or line's centroid), -1
    where none does; a point on an edge shared by tiles goes to the first of them."""
    import shapely
    out = np.full(len(geoms), -1, np.int64)
    present = np.array([g is not None and not g.is_empty for g in geoms], bool)
    if not present.any() or len(tiles.geoms) == 0:
        return out
    points = shapely.centroid(geoms[present])
    feature, tile = shapely.STRtree(tiles.geoms).query(points, predicate="intersects")
    order = np.lexsort((tile, feature))
    feature, tile = feature[order], tile[order]
    first = np.unique(feature, return_index=True)[1]
    hits = np.full(int(present.sum()), -1, np.int64)
    hits[feature[first]] = tile[first]
    out[np.flatnonzero(present)] = hits
    return out


def match_labels(labels: np.ndarray, classes: Sequence[str], class_ids: dict[str, str]) -> tuple[np.ndarray, dict]:
    """Reference labels spelt as map classes where they name one: exactly, by class id, or
    ignoring case and surrounding blanks. Returns the labels and {given: map class} of the
    ones rewritten."""
    exact = set(classes)
    folded: dict[str, list[str]] = {}
    for c in classes:
        folded.setdefault(c.casefold(), []).append(c)
    rewritten: dict[str, str] = {}
    out = labels.copy()
    for k, label in enumerate(labels):
        if label is None or label in exact:
            continue
        candidates = folded.get(label.casefold(), [])
        target = class_ids.get(label) or (candidates[0] if len(candidates) == 1 else None)
        if target is not None:
            out[k] = target
            rewritten[label] = target
    return out, rewritten


# -- writing ---------------------------------------------------------------------------------
def write_sample(path: Path, tiles: Tiles, picked: np.ndarray, design: SampleDesign, info: dict[str, str]) -> None:
    """The sample layer and its design tables into a new GeoPackage at `path`."""
    import shapely
    weight = dict(zip(design.classes, design.weights, strict=True))
    per_unit = {c: t / s if s else 0.0 for c, t, s in zip(design.classes, design.tiles, design.sizes, strict=True)}
    cls = tiles.map_class[picked]
    n = len(picked)
    data = [np.arange(1, n + 1, dtype=np.int32), cls.astype(object), tiles.keys[picked].astype(object),
            np.array([weight[c] for c in cls], np.float64), np.array([per_unit[c] for c in cls], np.float64),
            np.full(n, None, object)]
    names = ["sample_id", "map_class", KEY_FIELD, "stratum_weight", "sampling_weight", REFERENCE_FIELD]
    mask = [None] * 5 + [np.ones(n, bool)]  # `reference` is NULL until labeled
    write_gpkg_layer(path, shapely.to_wkb(tiles.geoms[picked]), data, names, layer=SAMPLE_LAYER, crs=tiles.crs,
                     geometry_type="Polygon", field_mask=mask)
    rows = design.strata_rows()
    strata = [np.array([r["map_class"] for r in rows], object), np.array([r["tiles"] for r in rows], np.int64),
              np.array([r["mapped_area"] for r in rows], np.float64), np.full(len(rows), tiles.area_unit, object),
              np.array([r["weight"] for r in rows], np.float64), np.array([r["sample_size"] for r in rows], np.int64)]
    write_gpkg_layer(path, None, strata, list(STRATA_COLUMNS), layer=STRATA_TABLE, append=True)
    write_gpkg_layer(path, None, [np.array(list(info), object), np.array(list(info.values()), object)],
                     ["key", "value"], layer=INFO_TABLE, append=True)
    check_vector(path, SAMPLE_LAYER, n)
    check_vector(path, STRATA_TABLE, len(rows))


def write_assessment_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """The assessment's long table (ROW_COLUMNS, no geometry) as a new GeoPackage."""
    text = {"measure", "map_class", "reference_class", "unit"}
    data: list[np.ndarray] = []
    mask: list[np.ndarray | None] = []
    for col in ROW_COLUMNS:
        values = [r[col] for r in rows]
        if col in text:
            data.append(np.array(values, object))
            mask.append(None)
        else:
            missing = np.array([v is None for v in values], bool)
            data.append(np.array([np.nan if v is None else v for v in values], np.float64))
            mask.append(missing)
    write_gpkg_layer(path, None, data, list(ROW_COLUMNS), layer=ASSESSMENT_TABLE, field_mask=mask)
    check_vector(path, ASSESSMENT_TABLE, len(rows))
