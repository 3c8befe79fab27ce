"""Sampled accuracy assessment and area estimation of a classified map (pure numpy).

    from asymkd.assess import draw_sample, estimate
    picked, design = draw_sample(map_class, tile_areas, n=400, seed=0)   # which tiles to label
    result = estimate(mapped_areas, map_labels, reference_labels)        # Olofsson et al. 2014

`layers` reads and writes the GeoPackages of the `sample` and `assess` commands.
"""

from __future__ import annotations

from .estimate import ROW_COLUMNS, Z95, Assessment, ClassEstimate, Interval, estimate, estimate_from_counts
from .sampling import DESIGNS, SampleDesign, allocate, draw_sample

__all__ = ["ROW_COLUMNS", "Z95", "Assessment", "ClassEstimate", "Interval", "estimate", "estimate_from_counts",
           "DESIGNS", "SampleDesign", "allocate", "draw_sample"]
