"""The `sample` and `assess` jobs: checks, reading, drawing or estimating, atomic outputs."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ConfigError, DataError
from ..events import Events
from ..fileio import check_writable, csv_text, temp_path
from .estimate import ROW_COLUMNS, Assessment, estimate
from .layers import (
    Reference,
    Tiles,
    match_labels,
    read_reference,
    read_tiles,
    tile_of_features,
    write_assessment_table,
    write_sample,
)
from .sampling import DESIGNS, SampleDesign, draw_sample

OUTPUT_NAMES = {"csv": "accuracy.csv", "json": "assessment.json", "gpkg": "assessment.gpkg"}
EXTERNAL = "external"  # the design of a reference layer that `sample` did not draw


@dataclasses.dataclass
class SampleResult:
    path: Path
    design: SampleDesign
    tiles: int       # tiles with a class, the population sampled
    skipped: int     # tiles without a class
    area_unit: str


@dataclasses.dataclass
class AssessResult:
    assessment: Assessment
    paths: dict[str, Path]
    warnings: list[str]


# -- sample -----------------------------------------------------------------------------------
def check_sample_options(n: int, design: str, min_per_class: int) -> None:
    if n < 1:
        raise ConfigError(f"--n must be at least 1, not {n}", "give the number of tiles to label, e.g. --n 400")
    if design not in DESIGNS:
        raise ConfigError(f"--design '{design}' is not one of {', '.join(DESIGNS)}", "use --design stratified")
    if min_per_class < 0:
        raise ConfigError(f"--min-per-class must not be negative, not {min_per_class}", "e.g. --min-per-class 30")


def _check_output_file(out: Path, inputs: list[Path], overwrite: bool) -> None:
    from ..classify.writer import check_not_inputs
    if out.suffix.lower() != ".gpkg":
        raise ConfigError(f"output {out} is not a .gpkg file", "name the output e.g. sample.gpkg")
    check_not_inputs([out], inputs)
    if out.is_dir():
        raise ConfigError(f"output {out} is a folder", "give a file name, e.g. sample.gpkg")
    if out.exists() and not overwrite:
        # a sample may hold hours of labeling: never replace one without being asked
        raise ConfigError(f"output {out} already exists", "pass --overwrite to replace it, or choose another name")


def sample_job(tiles_path: str | Path, out: str | Path, n: int, *, design: str = "stratified",
               min_per_class: int = 30, seed: int = 0, layer: str | None = None, overwrite: bool = False,
               events: Events) -> SampleResult:
    """Draw a sample of the classified tiles and write it, with its design, to `out`."""
    check_sample_options(n, design, min_per_class)
    tiles_path, out = Path(tiles_path), Path(out)
    _check_output_file(out, [tiles_path], overwrite)
    tiles = read_tiles(tiles_path, layer, events)
    if len(tiles.map_class) == 0:
        raise DataError(f"layer '{tiles.layer}' of {tiles_path} has no classified tile",
                        "classify a raster with `asymkd classify` first")
    if n > len(tiles.map_class):
        raise ConfigError(f"--n {n} is more than the {len(tiles.map_class)} classified tiles",
                          f"give --n {len(tiles.map_class)} or fewer")
    picked, drawn = draw_sample(tiles.map_class, tiles.areas, n, design=design, min_per_class=min_per_class,
                                seed=seed, classes=tiles.classes)
    for note in drawn.notes:
        events.warning(note)
    info = {"design": design, "seed": str(seed), "n": str(n), "min_per_class": str(min_per_class),
            "tiles_file": str(tiles_path.resolve()), "tiles_layer": tiles.layer, "area_unit": tiles.area_unit,
            "engine": f"asymkd {__version__}"}
    with temp_path(out) as tmp:  # nothing at `out` unless the whole sample was written
        write_sample(tmp, tiles, picked, drawn, info)
    events.metrics("sample", {"design": design, "n": n, "seed": seed, "strata": drawn.strata_rows()})
    events.result("sample", gpkg=out)
    return SampleResult(out, drawn, len(tiles.map_class), tiles.skipped, tiles.area_unit)


# -- assess -----------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path, inputs: list[Path]) -> dict[str, Path]:
    from ..classify.writer import check_not_inputs
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file", "give a folder for the assessment's files")
    paths = {k: out_dir / v for k, v in OUTPUT_NAMES.items()}
    check_not_inputs(list(paths.values()), inputs)
    check_writable(out_dir)
    return paths


def assess_job(tiles_path: str | Path, reference_path: str | Path, out_dir: str | Path, *,
               field: str = "reference", layer: str | None = None, reference_layer: str | None = None,
               events: Events) -> AssessResult:
    """Accuracy and area estimates of the tiles' map from reference labels, written to
    `out_dir` as accuracy.csv, assessment.json and assessment.gpkg (all or none)."""
    tiles_path, reference_path, out_dir = Path(tiles_path), Path(reference_path), Path(out_dir)
    paths = _check_out_dir(out_dir, [tiles_path, reference_path])
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        events.warning(message)

    tiles = read_tiles(tiles_path, layer, events)
    if len(tiles.map_class) == 0:
        raise DataError(f"layer '{tiles.layer}' of {tiles_path} has no classified tile",
                        "give the tiles the reference was collected on")
    ref = read_reference(reference_path, field, tiles, reference_layer, events)
    labels, relabeled = match_labels(ref.labels, tiles.classes, tiles.class_ids)
    if relabeled:
        warn("reference labels read as map classes: " + ", ".join(f"'{a}' -> '{b}'" for a, b in relabeled.items()))
    pairs = _sample_pairs(ref, labels, tiles, warn) if ref.is_sample else _joined_pairs(ref, labels, tiles, warn)
    map_labels, ref_labels, areas, counts, design, unit = pairs
    if len(map_labels) == 0:
        raise DataError(f"no feature of the reference {reference_path} (layer '{ref.layer}') has a label in its "
                        f"field '{field}'", f"fill the field '{field}' with the class seen on each sample unit, "
                        "then run it again")
    # what the estimators cannot give is in result.notes: the summary, the JSON and the metrics event carry it
    result = estimate(areas, map_labels, ref_labels, mapped_tiles=counts, design=design, area_unit=unit)
    extra = {"tiles": str(tiles_path), "tiles_layer": tiles.layer, "reference": str(reference_path),
             "reference_layer": ref.layer, "field": field, "warnings": warnings,
             "sample_design": _design_dict(ref.design)}
    _write_outputs(paths, result, extra)
    events.metrics("assess", summary_metrics(result))
    events.result("assess", **paths)
    return AssessResult(result, paths, warnings)


Pairs = tuple[list[str], list[str], dict[str, float], dict[str, int], str, str]


def _sample_pairs(ref: Reference, labels: np.ndarray, tiles: Tiles, warn) -> Pairs:
    """(map class, reference class) of the labeled units of a sample, with the strata it was
    drawn from."""
    design = ref.design
    assert design is not None and ref.keys is not None and ref.map_class is not None
    labeled = labels != None  # noqa: E711
    unlabeled = int((~labeled).sum())
    if unlabeled and labeled.any():
        warn(f"{unlabeled} of the {len(labels)} sample units have no label in '{ref.field}': left out "
             "(the estimates assume they are missing at random)")
    strays = labeled & np.isin(ref.map_class, list(design.classes), invert=True)
    if strays.any():
        warn(f"{int(strays.sum())} labeled features of the sample were not drawn by `asymkd sample` (no map class "
             "of its strata): left out")
        labeled &= ~strays
    current = dict(zip(tiles.keys.tolist(), tiles.map_class.tolist(), strict=True))
    changed = sum(1 for k, m in zip(ref.keys[labeled], ref.map_class[labeled], strict=True) if current.get(k) != m)
    if changed or tiles.mapped_tiles() != dict(zip(design.classes, design.tiles, strict=True)):
        warn(f"the tiles of {tiles.path} differ from the map the sample was drawn from ({changed} sampled tiles "
             "changed class or are missing): the estimates describe the map as it was sampled")
    return ([str(m) for m in ref.map_class[labeled]], [str(r) for r in labels[labeled]],
            dict(zip(design.classes, design.areas, strict=True)), dict(zip(design.classes, design.tiles, strict=True)),
            design.design, ref.area_unit)


def _joined_pairs(ref: Reference, labels: np.ndarray, tiles: Tiles, warn) -> Pairs:
    """(map class, reference class) of each labeled feature and the tile under it."""
    warn(f"the reference layer '{ref.layer}' is not a sample drawn by `asymkd sample`: the estimates assume its "
         "features are a probability sample of the map (post-stratified by map class), which they may not be")
    labeled = labels != None  # noqa: E711
    if not labeled.any():
        return [], [], {}, {}, EXTERNAL, tiles.area_unit
    missing = np.array([g is None for g in ref.geoms], bool)
    if missing[labeled].all():
        raise DataError(f"no labeled feature of the reference {ref.path} has a geometry in the tiles' CRS "
                        f"({tiles.crs}): they have no geometry, or their coordinates do not exist there",
                        "check the reference layer's CRS in QGIS, or save it in the tiles' CRS")
    if missing[labeled].any():
        warn(f"{int(missing[labeled].sum())} labeled reference features have no geometry, or could not be "
             "reprojected to the tiles' CRS: left out")
    tile = tile_of_features(tiles, ref.geoms)
    outside = labeled & ~missing & (tile < 0)
    if outside.any():
        warn(f"{int(outside.sum())} of the {int(labeled.sum())} labeled reference features lie outside the "
             "classified tiles: left out")
    unlabeled = int((~labeled).sum())
    if unlabeled:
        warn(f"{unlabeled} reference features have no label in '{ref.field}': left out")
    use = labeled & (tile >= 0)
    return ([str(m) for m in tiles.map_class[tile[use]]], [str(r) for r in labels[use]], tiles.mapped_areas(),
            tiles.mapped_tiles(), EXTERNAL, tiles.area_unit)


def _design_dict(design: SampleDesign | None) -> dict[str, Any] | None:
    if design is None:
        return None
    return {"design": design.design, "seed": design.seed, "n": design.n, "min_per_class": design.min_per_class,
            "strata": design.strata_rows()}


def assessment_csv(rows: list[dict[str, Any]]) -> str:
    return csv_text(rows, ROW_COLUMNS)


def _write_outputs(paths: dict[str, Path], result: Assessment, extra: dict[str, Any]) -> None:
    """All three files, each under a temporary name until every one is complete."""
    rows = result.to_rows()
    with ExitStack() as stack:
        tmp = {k: stack.enter_context(temp_path(p)) for k, p in paths.items()}
        tmp["csv"].write_text(assessment_csv(rows), encoding="utf-8")
        tmp["json"].write_text(result.to_json(**extra) + "\n", encoding="utf-8")
        write_assessment_table(tmp["gpkg"], rows)


def summary_metrics(result: Assessment) -> dict[str, Any]:
    """The headline figures for the event stream."""
    return {"design": result.design, "labels": result.labels, "area_unit": result.area_unit,
            "overall_accuracy": result.overall.as_dict(),
            "per_class": {c.name: {"users_accuracy": c.users.value, "producers_accuracy": c.producers.value,
                                   "mapped_area": c.mapped_area, "estimated_area": c.area.as_dict()}
                          for c in result.per_class},
            "notes": list(result.notes)}
