"""Accuracy and area from a labeled sample: the stratified estimators of Olofsson et al.
(2014), "Good practices for estimating area and assessing accuracy of land change", Remote
Sensing of Environment 148, 42-57.

The strata are the map classes i, with mapped area A_i and weight W_i = A_i / sum(A). From
the sample's error matrix of counts n_ij (map class i, reference class j; n_i. labels in
stratum i) come

    p_ij = W_i n_ij / n_i.                                     (eq. 4, area proportions)
    overall accuracy O = sum_j p_jj, user's U_i = p_ii / p_i., producer's P_j = p_jj / p.j
    V(O)   = sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)               (eq. 5)
    V(U_i) = U_i (1 - U_i) / (n_i. - 1)                           (eq. 6)
    V(P_j) = [W_j^2 (1 - P_j)^2 U_j (1 - U_j) / (n_j. - 1)
              + P_j^2 sum_{i != j} W_i^2 (n_ij / n_i.)(1 - n_ij / n_i.) / (n_i. - 1)] / p.j^2   (eq. 7,
              its N_i. and N.j divided by the total)
    area of class j = p.j * total area, SE(p.j)^2 = sum_i W_i^2 (n_ij/n_i.)(1 - n_ij/n_i.) / (n_i. - 1)
                                                                          (eqs. 9-10)

with 95 % intervals estimate +- 1.96 SE (clipped to 0..1 for accuracies and shares, to
0..total for areas). These are the paper's normal-approximation intervals: a class whose
labels all agree with the map adds no variance, so a small sample can give too narrow an
interval.

A simple random sample ("random") is analysed with the same formulas, post-stratified by map
class: W_i still come from the map and each class's number of labels is taken as fixed
(Olofsson et al. 2013, 2014), which is how the standard errors are meant for that design.

What the formulas cannot say is reported, never hidden in a NaN: a stratum with no label
(its area is left out and the estimates describe the rest of the map), a stratum with one
label (no variance from one label: the standard errors that need it are None), a reference
class that is not a map class (kept as a column of the matrix: its producer's accuracy is 0),
a map class no sample was labeled as (producer's accuracy undefined).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError

Z95 = 1.96
ROW_COLUMNS = ("measure", "map_class", "reference_class", "value", "se", "ci_low", "ci_high", "unit")


@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its standard error and confidence interval; None where undefined."""
    value: float | None
    se: float | None = None
    low: float | None = None
    high: float | None = None
    z: float | None = None   # the multiple of the SE the interval spans on each side

    @classmethod
    def of(cls, value: float | None, se: float | None, z: float, upper: float = 1.0) -> "Interval":
        """value +- z se, clipped to [0, upper]."""
        if value is None:
            return cls(None)
        if se is None:
            return cls(float(value))
        return cls(float(value), float(se), max(0.0, value - z * se), min(upper, value + z * se), z)

    @property
    def half_width(self) -> float | None:
        """Half the unclipped interval (z SE), the "+-" figure published tables give."""
        return None if self.se is None or self.z is None else self.se * self.z

    def as_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "se": self.se, "ci_low": self.low, "ci_high": self.high}


@dataclasses.dataclass(frozen=True)
class ClassEstimate:
    """One class: as a map stratum (tiles, area, weight, labels, user's accuracy) and as a
    reference class (labels, producer's accuracy, estimated share and area)."""
    name: str
    in_map: bool
    mapped_tiles: int | None
    mapped_area: float
    weight: float
    sample: int
    reference: int
    users: Interval
    producers: Interval
    proportion: Interval
    area: Interval

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.name, "in_map": self.in_map, "mapped_tiles": self.mapped_tiles,
                "mapped_area": self.mapped_area, "weight": self.weight, "sample": self.sample,
                "reference": self.reference, "users_accuracy": self.users.as_dict(),
                "producers_accuracy": self.producers.as_dict(), "area_proportion": self.proportion.as_dict(),
                "estimated_area": self.area.as_dict()}


@dataclasses.dataclass(frozen=True)
class Assessment:
    """The result: the error matrix in counts and in estimated area proportions (rows: map
    class, columns: reference class, both in the order of `classes`), the overall accuracy,
    each class's accuracies and estimated area, and notes on what could not be estimated."""
    classes: tuple[str, ...]
    counts: np.ndarray
    proportions: np.ndarray
    overall: Interval
    per_class: tuple[ClassEstimate, ...]
    map_area: float        # all mapped area
    covered_area: float    # the mapped area of the strata with labels (what the estimates describe)
    area_unit: str
    design: str
    z: float
    labels: int
    notes: tuple[str, ...]

    @property
    def estimator(self) -> str:
        """How the sample was analysed, in words."""
        if self.design == "stratified":
            return "stratified estimators of Olofsson et al. (2014), strata = map classes"
        return ("the same estimators, post-stratified by map class: the weights come from the map's areas and "
                "each class's number of labels is taken as fixed")

    def by_name(self, name: str) -> ClassEstimate:
        return self.per_class[self.classes.index(name)]

    def to_rows(self) -> list[dict[str, Any]]:
        """A long table (ROW_COLUMNS), one value per row: the matrix in counts and in area
        proportions, mapped areas and sample sizes per map class, overall accuracy, user's
        and producer's accuracies, estimated area shares and areas."""
        rows: list[dict[str, Any]] = []

        def add(measure: str, interval: Interval, map_class: str = "", reference_class: str = "",
                unit: str = "") -> None:
            rows.append({"measure": measure, "map_class": map_class, "reference_class": reference_class,
                         **interval.as_dict(), "unit": unit})

        for i, row in enumerate(self.classes):
            for j, col in enumerate(self.classes):
                add("count", Interval(int(self.counts[i, j])), row, col, "labels")
        for i, row in enumerate(self.classes):
            for j, col in enumerate(self.classes):
                add("area_proportion", Interval(float(self.proportions[i, j])), row, col)
        add("overall_accuracy", self.overall)
        for c in self.per_class:
            add("mapped_area", Interval(c.mapped_area), map_class=c.name, unit=self.area_unit)
            add("sample_size", Interval(c.sample), map_class=c.name, unit="labels")
            add("users_accuracy", c.users, map_class=c.name)
        for c in self.per_class:
            add("producers_accuracy", c.producers, reference_class=c.name)
            add("estimated_proportion", c.proportion, reference_class=c.name)
            add("estimated_area", c.area, reference_class=c.name, unit=self.area_unit)
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"design": self.design, "estimator": self.estimator, "z": self.z, "labels": self.labels,
                "area_unit": self.area_unit, "map_area": self.map_area, "covered_area": self.covered_area,
                "classes": list(self.classes),
                "overall_accuracy": self.overall.as_dict(),
                "per_class": [c.as_dict() for c in self.per_class],
                "error_matrix_counts": self.counts.astype(int).tolist(),
                "error_matrix_proportions": self.proportions.tolist(), "notes": list(self.notes)}

    def to_json(self, **extra: Any) -> str:
        """The result as JSON (None for what is undefined; `extra` adds top-level keys)."""
        from ..events import jsonable
        return json.dumps(jsonable({**self.as_dict(), **extra}), indent=2, ensure_ascii=False)


def estimate(mapped_areas: Mapping[str, float], map_labels: Sequence[str], reference_labels: Sequence[str], *,
             mapped_tiles: Mapping[str, int] | None = None, design: str = "stratified", z: float = Z95,
             area_unit: str = "ha") -> Assessment:
    """The assessment from each sample unit's (map class, reference class). `mapped_areas`
    names the strata (the map classes, in display order) and their areas; reference classes
    that are not map classes are added after them, in order of appearance."""
    if len(map_labels) != len(reference_labels):
        raise ValueError("map_labels and reference_labels differ in length")
    strata = [str(c) for c in mapped_areas]
    unknown = sorted({str(m) for m in map_labels} - set(strata))
    if unknown:
        raise DataError(f"sampled units of map classes with no mapped area: {', '.join(unknown)}",
                        "the sample must come from the map whose areas are given")
    extra = list(dict.fromkeys(str(r) for r in reference_labels if str(r) not in strata))
    classes = strata + extra
    index = {c: k for k, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), np.int64)
    for m, r in zip(map_labels, reference_labels, strict=True):
        counts[index[str(m)], index[str(r)]] += 1
    areas = [float(mapped_areas[c]) for c in strata] + [0.0] * len(extra)
    return estimate_from_counts(classes, counts, areas, in_map=len(strata), mapped_tiles=mapped_tiles,
                                design=design, z=z, area_unit=area_unit)


def estimate_from_counts(classes: Sequence[str], counts: np.ndarray, mapped_areas: Sequence[float], *,
                         in_map: int | None = None, mapped_tiles: Mapping[str, int] | None = None,
                         design: str = "stratified", z: float = Z95, area_unit: str = "ha") -> Assessment:
    """The assessment from a square matrix of counts (rows: map class, columns: reference
    class) and each class's mapped area; the first `in_map` classes (default all) are the
    map's strata."""
    names = tuple(str(c) for c in classes)
    n = np.asarray(counts, np.float64)
    areas = np.asarray(mapped_areas, np.float64)
    k = len(names)
    if n.shape != (k, k) or areas.shape != (k,):
        raise ValueError(f"counts must be {k} x {k} and mapped_areas {k} long")
    if np.any(n < 0) or np.any(areas < 0):
        raise ValueError("counts and areas must not be negative")
    in_map = k if in_map is None else in_map
    row_n = n.sum(axis=1)
    sampled = row_n > 0
    covered = float(areas[sampled].sum())
    if not sampled.any() or covered <= 0:
        raise DataError("no labeled sample unit lies in a mapped class",
                        "label some of the sample (the reference field) and run it again")
    s = _Strata(n, row_n, sampled, np.where(sampled, areas / covered, 0.0))
    notes = _notes(names, in_map, areas, s)
    classes_out = tuple(_class_estimate(j, names[j], j < in_map, areas, s, mapped_tiles, covered, z)
                        for j in range(k))
    overall = Interval.of(float(np.trace(s.p)), s.overall_se(), z)
    return Assessment(classes=names, counts=n.astype(np.int64), proportions=s.p, overall=overall,
                      per_class=classes_out, map_area=float(areas.sum()), covered_area=covered,
                      area_unit=area_unit, design=design, z=z, labels=int(n.sum()), notes=tuple(notes))


class _Strata:
    """The per-stratum quantities every estimator uses."""

    def __init__(self, n: np.ndarray, row_n: np.ndarray, sampled: np.ndarray, weights: np.ndarray):
        self.n, self.row_n, self.sampled, self.w = n, row_n, sampled, weights
        with np.errstate(invalid="ignore", divide="ignore"):
            self.frac = np.where(sampled[:, None], n / row_n[:, None], 0.0)   # n_ij / n_i.
        self.p = self.w[:, None] * self.frac                                  # p_ij
        self.col = self.p.sum(axis=0)                                         # p.j
        # a variance needs two labels in every stratum that carries weight
        self.variance_ok = bool(np.all(row_n[sampled] >= 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            # W_i^2 f (1 - f) / (n_i. - 1) for every cell; rows without labels are zero
            self.cell_var = np.where(sampled[:, None] & (row_n[:, None] >= 2),
                                     self.w[:, None] ** 2 * self.frac * (1 - self.frac) / (row_n[:, None] - 1), 0.0)

    def users(self, i: int) -> float | None:
        return float(self.frac[i, i]) if self.sampled[i] else None

    def users_se(self, i: int) -> float | None:
        u = self.users(i)
        if u is None or self.row_n[i] < 2:
            return None
        return float(np.sqrt(u * (1 - u) / (self.row_n[i] - 1)))

    def overall_se(self) -> float | None:
        if not self.variance_ok:
            return None
        diag = np.diag(self.frac)
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = np.where(self.sampled, self.w ** 2 * diag * (1 - diag) / (self.row_n - 1), 0.0)
        return float(np.sqrt(terms.sum()))

    def proportion_se(self, j: int) -> float | None:
        return float(np.sqrt(self.cell_var[:, j].sum())) if self.variance_ok else None

    def producers(self, j: int, stratum: bool) -> float | None:
        # undefined when nothing was labeled j, or when j's own stratum has no labels (its
        # correctly mapped part is unknown)
        if self.col[j] <= 0 or (stratum and not self.sampled[j]):
            return None
        return float(self.p[j, j] / self.col[j])

    def producers_se(self, j: int, stratum: bool) -> float | None:
        pa = self.producers(j, stratum)
        if pa is None or not self.variance_ok:
            return None
        own = 0.0
        if stratum and self.sampled[j]:
            u = float(self.frac[j, j])
            own = self.w[j] ** 2 * (1 - pa) ** 2 * u * (1 - u) / (self.row_n[j] - 1)
        others = pa ** 2 * sum(float(self.cell_var[i, j]) for i in range(len(self.w)) if i != j)
        return float(np.sqrt(own + others) / self.col[j])


def _class_estimate(j: int, name: str, stratum: bool, areas: np.ndarray, s: _Strata,
                    mapped_tiles: Mapping[str, int] | None, covered: float, z: float) -> ClassEstimate:
    share_se = s.proportion_se(j)
    share = float(s.col[j])
    return ClassEstimate(
        name=name, in_map=stratum,
        mapped_tiles=(int(mapped_tiles.get(name, 0)) if mapped_tiles is not None else None),
        mapped_area=float(areas[j]), weight=float(s.w[j]), sample=int(s.row_n[j]), reference=int(s.n[:, j].sum()),
        users=Interval.of(s.users(j), s.users_se(j), z) if stratum else Interval(None),
        producers=Interval.of(s.producers(j, stratum), s.producers_se(j, stratum), z),
        proportion=Interval.of(share, share_se, z),
        area=Interval.of(share * covered, None if share_se is None else share_se * covered, z, upper=covered))


def _notes(names: tuple[str, ...], in_map: int, areas: np.ndarray, s: _Strata) -> list[str]:
    """What the estimates leave out or cannot give, in words."""
    notes: list[str] = []
    total = float(areas.sum())
    for i in range(in_map):
        share = 100 * areas[i] / total if total > 0 else 0.0
        if areas[i] > 0 and not s.sampled[i]:
            notes.append(f"map class '{names[i]}' ({share:.1f} % of the mapped area) has no labeled sample: the "
                         f"estimates describe the rest of the map ({100 * (1 - areas[i] / total):.1f} %), and its "
                         "user's and producer's accuracies are undefined")
        elif s.sampled[i] and s.row_n[i] < 2:
            notes.append(f"map class '{names[i]}' has only 1 label: a standard error needs at least 2 per class, "
                         "so the standard errors of the overall accuracy, the producer's accuracies and the areas "
                         "are not given")
        if s.sampled[i] and s.n[:, i].sum() == 0:
            notes.append(f"no sample unit was labeled '{names[i]}': its producer's accuracy is undefined and its "
                         "estimated area is 0")
    for j in range(in_map, len(names)):
        notes.append(f"reference class '{names[j]}' is not a class of the map ({int(s.n[:, j].sum())} labels): kept "
                     "as a reference class; its user's accuracy is undefined and its producer's accuracy is 0")
    return notes
