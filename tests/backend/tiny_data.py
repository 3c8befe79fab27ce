"""Tiny on-disk folder datasets for engine tests (MS GeoTIFFs, RGB PNGs, pairs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ["Forest", "River", "Urban"]
TINY_CONFIG = {
    "teacher": {"backbone": "resnet18_w16", "epochs": 2, "folds": 2, "batch_size": 8, "input_size": 0},
    "matcher": {"backbone_ms": "resnet18_w16", "backbone_rgb": "resnet18_w16", "epochs": 1,
                "batch_size": 8, "embed_dim": 16},
    "distill": {"backbone": "resnet18_w16", "epochs": 2, "batch_size": 8, "attention_dim": 16,
                "attention_heads": 2, "input_size": 0},
    "data": {"bands": "sentinel2", "val_fraction": 0.25},
}


def write_ms(path: Path, data: np.ndarray, dtype: str = "uint16") -> None:
    """A georeferenced GeoTIFF of (bands, height, width) data."""
    import rasterio
    from rasterio.transform import from_origin
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=dtype, crs="EPSG:32632",
                       transform=from_origin(500000, 5200000, 10, 10)) as dst:
        dst.write(data.astype(dtype))


def write_rgb(path: Path, data: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(data, 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(path)


def make_dataset(root: Path, n_ms: int = 6, n_rgb: int = 8, size: int = 16, seed: int = 0,
                 classes: list[str] = CLASSES) -> dict[str, Path]:
    """MS (13 bands), paired RGB (same stems), RGB train/test and unlabeled folders."""
    rng = np.random.default_rng(seed)
    out = {k: root / k for k in ("ms", "rgb_paired", "rgb_train", "rgb_test", "rgb_unlabeled")}
    for c, name in enumerate(classes):
        level = 1000 + 1500 * c
        for i in range(n_ms):
            ms = rng.normal(level, 300, (13, size, size)).clip(1, 10000)
            write_ms(out["ms"] / name / f"{name}_{i}.tif", ms)
            write_rgb(out["rgb_paired"] / name / f"{name}_{i}.png", ms[[3, 2, 1]] / 40)
        for split, n in (("rgb_train", n_rgb), ("rgb_test", 4)):
            for i in range(n):
                rgb = rng.normal(40 + 50 * c, 20, (3, size, size))
                write_rgb(out[split] / name / f"{name}_{split}_{i}.png", rgb)
        for i in range(3):
            write_rgb(out["rgb_unlabeled"] / f"u_{name}_{i}.png", rng.normal(40 + 50 * c, 20, (3, size, size)))
    return out


def data_config(paths: dict[str, Path], unlabeled: bool = False) -> dict:
    data = {"ms": str(paths["ms"]), "rgb": str(paths["rgb_train"]), "rgb_paired": str(paths["rgb_paired"]),
            "rgb_test": str(paths["rgb_test"])}
    if unlabeled:
        data["rgb_unlabeled"] = str(paths["rgb_unlabeled"])
    return data
