"""Classify the tiles of a raster with an exported model into a styled GeoPackage.

    from asymkd.classify import classify
    result = classify("student.onnx", "scene.tif", "tiles.gpkg", xyz_zoom=None, events=events)

One polygon per tile with class_id, class_name, confidence, second_id, second_name,
second_prob, entropy (normalised, 0..1), uncertain (0/1, by --uncertain-below and
--uncertain-by), tile_key ("row/col" or "z/x/y") and the key's integer parts,
valid_fraction, and empty review fields (writer.TILE_FIELDS); per-class tiles, hectares
and shares as the table `class_areas` and as `<stem>_areas.csv` beside it; a QML style
beside it and inside it; optionally a class raster. Reads are prefetched in a background
thread, inference is batched onnxruntime (on the CPU several batches at once, one per
thread: `streams`), memory stays bounded, and outputs appear only when the whole job has
succeeded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..events import NULL_EVENTS, Events
from .options import (
    DEFAULT_UNCERTAIN_BY,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    MAX_STREAMS,
    MAX_THREADS,
    MAX_TILE,
    ClassifyOptions,
    ClassifyResult,
)

__all__ = ["ClassifyOptions", "ClassifyResult", "classify", "DEFAULT_UNCERTAIN_BY", "MAX_BATCH", "MAX_BATCH_BYTES",
           "MAX_STREAMS", "MAX_THREADS", "MAX_TILE"]


def classify(model: str | Path, raster: str | Path, out: str | Path, *, events: Events = NULL_EVENTS,
             options: ClassifyOptions | None = None, **kwargs: Any) -> ClassifyResult:
    """Classify every tile of `raster` in the area with the ONNX `model` into `out` (.gpkg).

    Options are a `ClassifyOptions` or its fields as keyword arguments. Raises the
    engine's user errors (DataError, ConfigError, ModelFileError); on any error or cancel
    no output file is left behind.
    """
    opts = dataclasses.replace(options or ClassifyOptions(), **kwargs)
    opts.check()
    from .cluster import starting
    with starting(opts) as cluster:  # a local cluster's workers start while the engine is imported
        from .run import run_classify
        return run_classify(Path(model), Path(raster), Path(out), opts, events, cluster)
