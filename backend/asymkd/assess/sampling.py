"""Which map tiles to label: a stratified random sample by map class, or a simple random one.

Stratified allocation follows Olofsson et al. (2014, section 4.1): every class gets at least
`min_per_class` tiles (all of its tiles when it has fewer), so that rare classes get a user's
accuracy worth reporting; the rest of the sample goes to the classes in proportion to their
mapped area, which keeps the overall accuracy and the area estimates precise. When `n` cannot
give every class its minimum, it is shared out as equally as the classes' tiles allow.

Draws are reproducible: the same tiles, classes and seed give the same sample (a numpy
Generator seeded once, classes drawn in their given order).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DESIGNS = ("stratified", "random")


@dataclasses.dataclass(frozen=True)
class SampleDesign:
    """How a sample was drawn: the strata (map classes), their tiles and mapped areas, and
    the number of tiles drawn from each (for `random`, the numbers that happened to fall in
    each class)."""
    design: str
    seed: int
    n: int
    min_per_class: int
    classes: tuple[str, ...]
    tiles: tuple[int, ...]
    areas: tuple[float, ...]
    sizes: tuple[int, ...]
    notes: tuple[str, ...] = ()

    @property
    def weights(self) -> tuple[float, ...]:
        """Each stratum's share of the mapped area (Olofsson's W_i)."""
        total = float(sum(self.areas))
        return tuple(a / total if total > 0 else 0.0 for a in self.areas)

    def strata_rows(self) -> list[dict[str, object]]:
        """One row per stratum: class, tiles, mapped area, weight, sample size."""
        return [{"map_class": c, "tiles": t, "mapped_area": a, "weight": w, "sample_size": s}
                for c, t, a, w, s in zip(self.classes, self.tiles, self.areas, self.weights, self.sizes,
                                         strict=True)]


def allocate(tiles: Sequence[int] | np.ndarray, areas: Sequence[float] | np.ndarray, n: int,
             min_per_class: int) -> np.ndarray:
    """Tiles to draw per class: at least `min_per_class` (capped at the class's tiles), the
    rest in proportion to the mapped areas (capped likewise, the excess going to the other
    classes). Raises ValueError when n is below 1 or above the tiles there are."""
    counts = np.asarray(tiles, np.int64)
    weights = np.asarray(areas, np.float64)
    if n < 1 or n > int(counts.sum()):
        raise ValueError(f"n = {n} must be between 1 and the {int(counts.sum())} tiles")
    if min_per_class < 0:
        raise ValueError(f"min_per_class = {min_per_class} must not be negative")
    base = np.minimum(counts, min_per_class)
    if int(base.sum()) >= n:
        return equal_share(counts, weights, n)
    return base + proportional(n - int(base.sum()), weights, counts - base)


def proportional(total: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """`total` units shared in proportion to `weights` (largest remainders), none above its
    `capacity`; what a full class cannot take goes to the others in the same proportion.
    Classes of zero weight are used only when the others are full."""
    out = np.zeros(len(capacity), np.int64)
    left = int(total)
    while left > 0:
        open_ = out < capacity
        w = np.where(open_, np.maximum(weights, 0.0), 0.0)
        if w.sum() <= 0:  # only weightless classes have room: share by their room
            w = np.where(open_, (capacity - out).astype(np.float64), 0.0)
        share = _largest_remainder(left, w)
        take = np.minimum(share, capacity - out)
        out += take
        left -= int(take.sum())
    return out


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total`, proportional to `weights` (Hamilton's method); ties go to
    the larger weight, then to the earlier class, so the result is deterministic."""
    quota = total * weights / weights.sum()
    out = np.floor(quota).astype(np.int64)
    short = total - int(out.sum())
    order = np.lexsort((np.arange(len(weights)), -weights, -(quota - out)))
    out[order[:short]] += 1
    return out


def equal_share(tiles: np.ndarray, areas: np.ndarray, n: int) -> np.ndarray:
    """n shared as equally as possible, no class above its tiles; odd units go to the
    classes of largest area first."""
    counts = np.asarray(tiles, np.int64)
    out = np.zeros(len(counts), np.int64)
    order = np.lexsort((np.arange(len(counts)), -np.asarray(areas, np.float64)))
    left = n
    while left > 0:
        for i in order:
            if left == 0:
                break
            if out[i] < counts[i]:
                out[i] += 1
                left -= 1
    return out


def draw_sample(map_class: np.ndarray, tile_areas: np.ndarray, n: int, *, design: str = "stratified",
                min_per_class: int = 30, seed: int = 0,
                classes: Sequence[str] | None = None) -> tuple[np.ndarray, SampleDesign]:
    """Indices (into `map_class`) of the sampled tiles, in the random order they were drawn,
    and the design. `map_class` holds each tile's class name, `tile_areas` its area;
    `classes` orders the strata (default: sorted names)."""
    if design not in DESIGNS:
        raise ValueError(f"design '{design}' is not one of {', '.join(DESIGNS)}")
    labels = np.asarray(map_class, dtype=object)
    names = tuple(classes) if classes is not None else tuple(sorted(set(labels.tolist())))
    members = [np.flatnonzero(labels == c) for c in names]
    counts = np.array([len(m) for m in members], np.int64)
    areas = np.array([float(np.sum(tile_areas[m])) for m in members], np.float64)
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if design == "random":
        if n < 1 or n > int(counts.sum()):
            raise ValueError(f"n = {n} must be between 1 and the {int(counts.sum())} tiles")
        picked = rng.choice(np.concatenate(members), size=n, replace=False)
        sizes = np.array([np.isin(picked, m).sum() for m in members], np.int64)
    else:
        sizes = allocate(counts, areas, n, min_per_class)
        if np.any(sizes < np.minimum(counts, min_per_class)):
            notes.append(f"n = {n} is too small for {min_per_class} tiles in each of the {len(names)} classes; "
                         "it was shared out as equally as the classes' tiles allow")
        picked = np.concatenate([rng.choice(m, size=int(s), replace=False) for m, s in zip(members, sizes,
                                                                                             strict=True)])
        picked = rng.permutation(picked)  # labelled in random order, not class by class
    return picked.astype(np.int64), SampleDesign(
        design=design, seed=seed, n=n, min_per_class=min_per_class, classes=names,
        tiles=tuple(int(c) for c in counts), areas=tuple(float(a) for a in areas),
        sizes=tuple(int(s) for s in sizes), notes=tuple(notes))
