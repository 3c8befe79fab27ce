"""The MS samples as the RGB sensor would see them: the matcher's positives and the
distilled student's extra rows.

Each labeled MS sample gets one RGB image of its own target: its explicit same-target RGB
(a file of the paired RGB folder sharing its stem) where there is one, else its true-colour
bands (picked by wavelength) brought to the RGB sensor's scale: by a per-band linear fit on
the pairs where there are at least two, else, given a reference RGB set, by matching each
band's mean and spread to it. A sensor saturates, so calibrated bands are clipped to the
range of the RGB images they were fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..choices import POSITIVES
from ..errors import DataError
from ..events import NULL_EVENTS, Events
from .bands import true_colour_indices
from .patches import PatchSet, match_pairs


@dataclass
class SameTarget:
    """One RGB image per MS sample it covers."""

    ms_index: np.ndarray  # rows of the MS set
    images: np.ndarray    # (N, 3, H, W) on the RGB sensor's scale (raw true colour: see `same_target_rgb`)
    source: str           # "pairs", "pairs+pseudo-rgb" or "pseudo-rgb"

    def __len__(self) -> int:
        return len(self.ms_index)


def pseudo_rgb(ms: PatchSet) -> np.ndarray:
    """The MS patches' true-colour bands (R, G, B order) picked by wavelength."""
    r, g, b = true_colour_indices(ms.band_names)
    return ms.images[:, [r, g, b]]


def fit_to_pairs(pseudo: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band gain and offset taking pseudo-RGB patch means to the paired RGB patch means."""
    p = pseudo.reshape(len(pseudo), 3, -1).mean(-1).astype(np.float64)
    r = rgb.reshape(len(rgb), 3, -1).mean(-1).astype(np.float64)
    gain, offset = np.ones(3), np.zeros(3)
    for b in range(3):
        if np.ptp(p[:, b]) > 0:
            gain[b], offset[b] = np.polyfit(p[:, b], r[:, b], 1)
    return gain, offset


MIN_SPECTRAL_PAIRS = 8      # pairs needed to fit the RGB camera's response from every MS band
_SPECTRAL_PIXELS = 200_000  # pixels the fit samples (plenty for 2 x bands + 1 weights per channel)


def _pixels(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) images as (N*H*W, C) pixels."""
    return images.transpose(0, 2, 3, 1).reshape(-1, images.shape[1]).astype(np.float64)


def _spectral_features(x: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(n, C) MS pixels as (n, 2C+1) features: each band standardised, its square root (a
    camera's tone curve is concave) and a constant."""
    z = (x - centre) / scale
    return np.hstack([z, np.sqrt(np.clip(x, 0, None) / scale), np.ones((len(x), 1))])


def fit_spectral(ms: np.ndarray, rgb: np.ndarray, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """The RGB camera's response to every MS band, fitted per pixel on same-target pairs (MS
    resampled to the RGB size): another sensor's bands mix the MS ones (a red that reaches
    the red edge) and pass them through its tone curve, which true colour alone cannot show.
    Ridge least squares on a sample of pixels; returns MS (N, C, H, W) -> RGB (N, 3, H, W)."""
    x = _pixels(ms)
    centre, scale = x.mean(0), np.maximum(x.std(0), 1e-6)
    pick = np.random.default_rng(seed).choice(len(x), size=min(len(x), _SPECTRAL_PIXELS), replace=False)
    a = _spectral_features(x[pick], centre, scale)  # features of the sampled pixels only
    y = _pixels(rgb)[pick]
    weights = np.linalg.solve(a.T @ a + 1e-3 * len(a) * np.eye(a.shape[1]), a.T @ y)

    def predict(images: np.ndarray) -> np.ndarray:
        n, _, h, w = images.shape
        out = np.concatenate([_spectral_features(_pixels(images[i:i + 64]), centre, scale) @ weights
                              for i in range(0, n, 64)]) if n else np.zeros((0, 3))
        return out.reshape(n, h, w, 3).transpose(0, 3, 1, 2)
    return predict


def fit_to_moments(pseudo: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band gain and offset giving the pseudo-RGB pixels the reference's mean and spread
    (no pairs needed: both sets show the same classes, in other places)."""
    axes = (0, 2, 3)  # per band, over every image and pixel (no transposed float64 copy)
    gain = reference.std(axis=axes, dtype=np.float64) / np.maximum(pseudo.std(axis=axes, dtype=np.float64), 1e-12)
    return gain, reference.mean(axis=axes, dtype=np.float64) - gain * pseudo.mean(axis=axes, dtype=np.float64)


def resample(images: np.ndarray, size: int | None) -> np.ndarray:
    """(N, C, H, W) images at `size` x `size` pixels (bilinear; antialiased when shrinking),
    so MS samples of another patch size can stand beside the RGB sensor's patches."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    from torch.nn import functional as F
    out = [F.interpolate(torch.as_tensor(images[i:i + 256], dtype=torch.float32), size=(size, size),
                         mode="bilinear", align_corners=False, antialias=True).numpy()
           for i in range(0, len(images), 256)]
    return np.concatenate(out).astype(images.dtype) if out else images[:, :, :size, :size]


def _apply(pseudo: np.ndarray, gain: np.ndarray, offset: np.ndarray, fitted_to: np.ndarray) -> np.ndarray:
    return _clip_like(pseudo * gain[None, :, None, None] + offset[None, :, None, None], fitted_to)


def _clip_like(images: np.ndarray, fitted_to: np.ndarray) -> np.ndarray:
    """A sensor saturates: values within the range of the images a fit was made to."""
    return np.clip(images, float(fitted_to.min()), float(fitted_to.max())).astype(fitted_to.dtype)


def _to_reference(images: np.ndarray, reference: PatchSet) -> np.ndarray:
    """`images` with the colour statistics (per band mean and spread) of the labeled images
    of `reference`, clipped to their range. Pairs show the MS samples' own places; the RGB
    set another place and season (haze, light), which every row is brought to."""
    labeled = reference.images[reference.labeled]
    gain, offset = fit_to_moments(images, labeled)
    return _apply(images, gain, offset, labeled)


def same_target_rgb(ms: PatchSet, rgb_paired: PatchSet | None, mode: str = "auto",
                    reference: PatchSet | None = None, events: Events = NULL_EVENTS,
                    size: int | None = None) -> SameTarget:
    """An RGB image of each labeled MS sample's own target, at `size` pixels when given (else
    the paired RGB's size where there are pairs: another sensor's patches may be larger).

    mode "pairs": the explicit pairs alone; "pseudo-rgb": true colour for every sample; "auto":
    the pairs, plus calibrated true colour for the samples without one. True colour is
    calibrated on the pairs (auto, two or more pairs) or to the labeled images of `reference`
    (an RGB set of the same classes) and left on the MS scale when there is neither; given
    `reference`, pairs and true colour alike end with its colour statistics."""
    if mode not in POSITIVES:
        raise ValueError(f"mode must be one of {list(POSITIVES)}, not {mode!r}")
    if mode == "pairs" and rgb_paired is None:
        raise DataError("matcher.positives is 'pairs' but no paired RGB folder was given",
                        "give --rgb-paired DIR (same file stems as the MS set) or use positives=auto")
    idx = np.flatnonzero(ms.labeled)
    if rgb_paired is not None and mode != "pseudo-rgb":
        size = size or rgb_paired.size  # the RGB sensor's patches, which true colour joins
        ms_idx, rgb_idx = match_pairs(ms, rgb_paired)
        keep = ms.labels[ms_idx] >= 0
        ms_idx, rgb_images = ms_idx[keep], resample(rgb_paired.images[rgb_idx[keep]], size)
        events.log(f"{len(ms_idx)} explicit same-target pairs")
        rest = np.setdiff1d(idx, ms_idx)
        if mode == "pairs" or len(rest) == 0 or len(ms_idx) < 2:
            return SameTarget(ms_idx, rgb_images if reference is None else _to_reference(rgb_images, reference),
                              "pairs")
        # The MS samples without a pair join as true colour brought to the RGB sensor's scale
        # by a per-band linear fit on the pairs: more same-target images than the pairs alone.
        if len(ms_idx) >= MIN_SPECTRAL_PAIRS:
            predict = fit_spectral(resample(ms.images[ms_idx], size), rgb_images)
            extra = _clip_like(predict(resample(ms.images[rest], size)), rgb_images)
            events.log(f"{len(rest)} more MS samples as the RGB camera's response to their bands, fitted on "
                       "the pairs")
        else:
            gain, offset = fit_to_pairs(pseudo_rgb(ms)[ms_idx], rgb_images)
            extra = _apply(resample(pseudo_rgb(ms)[rest], size), gain, offset, rgb_images)
            events.log(f"{len(rest)} more MS samples as true colour calibrated on the pairs")
        images = np.concatenate([rgb_images, extra])
        if reference is not None:
            images = _to_reference(images, reference)
        return SameTarget(np.concatenate([ms_idx, rest]), images, "pairs+pseudo-rgb")
    images = resample(pseudo_rgb(ms)[idx], size)
    if reference is not None:
        images = _to_reference(images, reference)
    events.log(f"true colour from MS bands {true_colour_indices(ms.band_names)}")
    return SameTarget(idx, images, "pseudo-rgb")
