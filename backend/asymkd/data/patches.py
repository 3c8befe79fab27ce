"""Patch sets held in memory: folder datasets (EuroSAT layout) and explicit pairs.

A folder dataset is `root/<Class>/*.tif|tiff|jpg|jpeg|png`; a folder with images and no
class subfolders is an unlabeled set (labels -1). Images beside class folders are refused
(they would have no class), and folders whose names start with "." (.git, .ipynb_checkpoints)
are not classes: they are skipped with a warning. Patches are small (EuroSAT: 64x64), so a
set is one (N, C, H, W) float32 array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError
from ..models.metadata import MAX_CHANS, MAX_NAME, control_chars
from .bands import default_band_names, parse_band_names

IMAGE_SUFFIXES = {".tif", ".tiff", ".jpg", ".jpeg", ".png"}
UNLABELED = -1
MS_SET = "the MS set"  # the set that fixes a run's classes (the teacher's training set)


@dataclasses.dataclass
class PatchSet:
    """Images (N, C, H, W) float32 in the file's units, labels (N,) with -1 = unlabeled."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    band_names: list[str]
    stems: list[str]
    paths: list[str]
    modality: str = "rgb"
    gsd: float | None = None  # ground resolution (m) when the files are georeferenced

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError("images must be (N, C, H, W) with one label per image")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_bands(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def labeled(self) -> np.ndarray:
        return self.labels >= 0

    def subset(self, index: Sequence[int] | np.ndarray) -> "PatchSet":
        index = np.asarray(index, dtype=np.int64)
        return dataclasses.replace(
            self, images=self.images[index], labels=self.labels[index],
            stems=[self.stems[i] for i in index], paths=[self.paths[i] for i in index])

    def restrict_classes(self, names: Sequence[str]) -> "PatchSet":
        """The samples of `names` only (unlabeled ones kept), labelled in the order of `names`."""
        missing = [n for n in names if n not in self.class_names]
        if missing:
            raise DataError(f"classes {', '.join(missing)} are not among the {self.modality} set's "
                            f"({', '.join(self.class_names)})", "use class names the teacher knows")
        if list(names) == self.class_names:
            return self
        remap = np.full(len(self.class_names) + 1, -2, dtype=np.int64)  # -2: a class left out
        remap[-1] = UNLABELED  # labels -1 index the last slot
        for new, name in enumerate(names):
            remap[self.class_names.index(name)] = new
        labels = remap[self.labels]
        keep = np.flatnonzero(labels != -2)
        out = self.subset(keep)
        return dataclasses.replace(out, labels=labels[keep], class_names=list(names))

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names))
        return {c: int(n) for c, n in zip(self.class_names, counts, strict=True)}

    def identity(self, *others: "PatchSet | None") -> str:
        """A hash of this set's content (pixels, labels, file stems, class and band names) and
        of `others`': what a resumed training step must find unchanged."""
        return content_identity(*(part for ps in (self, *others)
                                  for part in ((None,) if ps is None else
                                               (ps.images, ps.labels, ps.stems, ps.class_names, ps.band_names))))


def content_identity(*parts: Any) -> str:
    """A short hash of arrays (numpy or torch, by dtype, shape and bytes), lists and strings."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        if hasattr(part, "detach"):  # a torch tensor
            part = part.detach().cpu().contiguous().numpy()
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            digest.update(f"array {part.dtype.str} {part.shape}".encode())
            digest.update(part.reshape(-1).view(np.uint8).data)
        else:
            digest.update(json.dumps(part, default=str).encode("utf-8", "backslashreplace"))
        digest.update(b"|")
    return digest.hexdigest()


def read_image(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """One image as (C, H, W) float32 and its band descriptions if the file has them."""
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import rasterio
            with rasterio.open(path) as src:
                data = src.read().astype(np.float32)
                names = list(src.descriptions) if all(src.descriptions) else None
            return data, names
        from PIL import Image
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32)
        return arr.transpose(2, 0, 1), None
    except Exception as exc:  # rasterio, PIL and OS errors all mean "cannot read this file"
        raise DataError(f"cannot read image {path}: {exc}",
                        "remove or replace the corrupt file") from exc


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


Warn = Callable[[str], None]
_WARNED: set[str] = set()  # each warning once per process (a folder is scanned by a step's check and its load)


def _warn_once(message: str, warn: Warn | None) -> None:
    if message in _WARNED:
        return
    _WARNED.add(message)
    if warn is None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    else:
        warn(message)


def _listed(paths: Sequence[Path], limit: int = 5) -> str:
    names = [ascii(p.name)[1:-1] for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def scan_folder(root: Path, warn: Warn | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) items of a folder dataset; labels -1 when unlabeled.

    Folders whose names start with "." are skipped, with a warning through `warn` (else on
    stderr); images beside class folders are a DataError (they would have no class)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist",
                        "give a folder laid out as root/<Class>/<image files>")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    class_dirs = [p for p in folders if not p.name.startswith(".")]
    hidden = [p for p in folders if p.name.startswith(".")]
    loose = _images_in(root)
    if hidden:
        _warn_once(f"dataset folder {root}: skipped {len(hidden)} folder(s) whose names start with '.' "
                   f"({_listed(hidden)}); such folders are not classes, rename them to use their images",
                   warn)
    if not class_dirs:
        if not loose:
            raise DataError(f"dataset folder {root} has no class folders and no images",
                            "lay it out as root/<Class>/<image files> (or images directly for an unlabeled set)")
        return [], [(p, UNLABELED) for p in loose]
    if loose:
        raise DataError(f"dataset folder {root} holds {len(loose)} image(s) beside its class folders, which "
                        f"would have no class: {_listed(loose)}",
                        "move each image into its class folder, or into a folder of its own given as the "
                        "unlabeled set (--rgb-unlabeled)")
    items: list[tuple[Path, int]] = []
    empty = []
    for label, d in enumerate(class_dirs):
        files = _images_in(d)
        if not files:
            empty.append(d.name)
        items += [(f, label) for f in files]
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty)}",
                        "add .tif/.jpg/.png images or remove the empty folder(s)")
    _check_class_names([d.name for d in class_dirs], root)
    return [d.name for d in class_dirs], items


def _check_class_names(names: list[str], root: Path) -> None:
    """Class names end up in model files, QML styles and messages: control characters
    (terminal escapes, newlines) would corrupt them, so such folders are refused."""
    bad = [n for n in names if control_chars(n)]
    if bad:
        raise DataError(f"class folder name(s) in {root} contain control characters: "
                        f"{', '.join(ascii(n) for n in bad)}",
                        "rename the folder(s) to plain names, e.g. Forest or Sea_Lake")


def _check_band_names(names: list[str], example: Path) -> None:
    """What a model file may hold (models/metadata.py), refused here rather than after training."""
    if len(names) > MAX_CHANS:
        raise DataError(f"the images of {example.parent.parent} have {len(names)} bands; at most {MAX_CHANS} "
                        "are supported", "select the bands to use, e.g. with gdal_translate -b")
    bad = [n for n in names if control_chars(n) or len(n) > MAX_NAME]
    if bad:
        raise DataError(f"band names of {example} hold control characters or are longer than {MAX_NAME} "
                        f"characters: {', '.join(ascii(n) for n in bad[:3])}",
                        "name the bands with --bands (e.g. --bands sentinel2 or B01,B02,...)")


def _non_finite_files(items: list[tuple[Path, int]], arrays: list[np.ndarray]) -> list[Path]:
    # NaN is a common nodata value of float GeoTIFFs; it would make the normalisation
    # statistics and then every weight NaN, so such patches are refused here.
    return [p for (p, _), a in zip(items, arrays, strict=True) if a.dtype.kind == "f" and not np.isfinite(a).all()]


def check_known_classes(classes: Sequence[str], known: Sequence[str], where: str,
                        known_from: str = MS_SET) -> None:
    """Refuse classes of `where` that `known_from` has no sample of. The set a model learns
    from fixes its classes: pairing is same-class, and a model predicts only its own classes."""
    missing = [c for c in dict.fromkeys(classes) if c not in known]
    if missing:
        raise DataError(f"classes of {where} with no sample in {known_from}: {', '.join(missing)} "
                        f"({known_from} has: {', '.join(known)})",
                        f"add samples of these classes to {known_from}, or leave these classes out of {where}")


def load_folder(root: str | Path, modality: str, bands: str | list[str] | None = None,
                class_names: list[str] | None = None, workers: int = 8,
                known_from: str = "the model's training set", warn: Warn | None = None) -> PatchSet:
    """Read a folder dataset into memory.

    `class_names`, when given, fixes the label order (e.g. the teacher's); folder classes
    not in it are an error that names `known_from`, the set those classes come from.
    `warn` receives what was skipped (see `scan_folder`).
    """
    root = Path(root)
    found, items = scan_folder(root, warn)
    names = list(found) if class_names is None else list(class_names)
    check_known_classes(found, names, f"{modality.upper()} folder {root}", known_from)
    remap = {i: names.index(c) for i, c in enumerate(found)}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        read = list(pool.map(lambda it: read_image(it[0]), items))
    bad = _non_finite_files(items, [r[0] for r in read])
    if bad:
        shown = ", ".join(str(p) for p in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} image(s) in {root} hold non-finite pixel values (NaN or infinity, "
                        f"e.g. NaN used as nodata): {shown}",
                        "remove those patches, or replace their NaN pixels with numbers "
                        "(e.g. with gdal_fillnodata or QGIS' Fill nodata)")
    shapes = {r[0].shape for r in read}
    if len(shapes) > 1:
        by_shape: dict[tuple, Path] = {}
        for (p, _), (arr, _) in zip(items, read, strict=True):
            by_shape.setdefault(arr.shape, p)
        detail = "; ".join(f"{s} e.g. {p.name}" for s, p in by_shape.items())
        raise DataError(f"images in {root} differ in band count or size: {detail}",
                        "every patch of one dataset needs the same bands and size")
    images = np.stack([r[0] for r in read])
    file_names = read[0][1]
    band_names = parse_band_names(bands, images.shape[1]) or file_names or default_band_names(images.shape[1])
    _check_band_names(band_names, items[0][0])
    labels = np.array([remap.get(lab, UNLABELED) if lab >= 0 else UNLABELED for _, lab in items])
    return PatchSet(images=images, labels=labels, class_names=names, band_names=band_names,
                    stems=[p.stem for p, _ in items], paths=[str(p) for p, _ in items],
                    modality=modality, gsd=ground_resolution(items[0][0]))


def ground_resolution(path: Path) -> float | None:
    """Pixel size in metres of a georeferenced GeoTIFF in a projected CRS, else None."""
    if path.suffix.lower() not in {".tif", ".tiff"}:
        return None
    import rasterio
    with rasterio.open(path) as src:
        if src.crs is None or not src.crs.is_projected or src.transform.is_identity:
            return None
        return float(abs(src.transform.a))


def require_classes(data: PatchSet, minimum: int = 2) -> None:
    present = [c for c, n in data.class_counts().items() if n > 0]
    if len(present) < minimum:
        raise DataError(f"{data.modality} dataset has {len(present)} class(es) with labeled samples "
                        f"({', '.join(present) or 'none'}); at least {minimum} are needed",
                        "add class folders with images")


def match_pairs(ms: PatchSet, rgb: PatchSet) -> tuple[np.ndarray, np.ndarray]:
    """Explicit same-target pairs: indices (ms_idx, rgb_idx) of files sharing a stem."""
    rgb_by_stem = {s: i for i, s in enumerate(rgb.stems)}
    pairs = [(i, rgb_by_stem[s]) for i, s in enumerate(ms.stems) if s in rgb_by_stem]
    if not pairs:
        raise DataError("no file stems shared between the MS and the paired RGB folders",
                        "paired files must share a stem, e.g. ms/Forest/F_1.tif and rgb/Forest/F_1.jpg")
    arr = np.array(pairs, dtype=np.int64)
    return arr[:, 0], arr[:, 1]
