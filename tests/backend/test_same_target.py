"""Each MS sample's own target in RGB: explicit pairs, and true colour calibrated on the pairs
or to a reference RGB set (the matcher's positives and the distilled student's MS rows)."""

from __future__ import annotations

import numpy as np

from asymkd import config as config_mod
from asymkd.data.patches import load_folder
from asymkd.data.same_target import pseudo_rgb, same_target_rgb
from asymkd.events import NULL_EVENTS
from tiny_data import make_dataset


def test_unpaired_ms_samples_join_as_pseudo_rgb_on_the_rgb_scale(tmp_path):
    paths = make_dataset(tmp_path)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    paired = load_folder(paths["rgb_paired"], "rgb", class_names=ms.class_names)
    half = paired.subset(np.arange(0, len(paired), 2))
    cfg = config_mod.RunConfig()
    got = same_target_rgb(ms, half, cfg.matcher.positives, events=NULL_EVENTS)
    ms_idx, images, source = got.ms_index, got.images, got.source
    assert source == "pairs+pseudo-rgb"
    assert sorted(ms_idx.tolist()) == list(range(len(ms)))  # every MS sample has a positive
    n_pairs = len(half)
    # the added pseudo-RGB is on the paired RGB's scale (8-bit), not the MS reflectance scale
    added = images[n_pairs:]
    assert abs(float(added.mean()) - float(half.images.mean())) < 0.25 * float(half.images.mean())
    assert float(pseudo_rgb(ms).mean()) > 5 * float(added.mean())
    # explicit pairs only, when asked
    got = same_target_rgb(ms, half, "pairs", events=NULL_EVENTS)
    ms_idx, images, source = got.ms_index, got.images, got.source
    assert source == "pairs" and len(ms_idx) == n_pairs


def test_without_pairs_true_colour_takes_the_reference_rgb_scale(tmp_path):
    paths = make_dataset(tmp_path)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    rgb = load_folder(paths["rgb_train"], "rgb", class_names=ms.class_names)
    got = same_target_rgb(ms, None, "auto", reference=rgb, events=NULL_EVENTS)
    assert got.source == "pseudo-rgb" and sorted(got.ms_index.tolist()) == list(range(len(ms)))
    per_band = got.images.transpose(1, 0, 2, 3).reshape(3, -1)
    ref = rgb.images.transpose(1, 0, 2, 3).reshape(3, -1)
    # each band has the reference's mean (clipping to its range moves it a little) and stays in range
    assert np.allclose(per_band.mean(1), ref.mean(1), rtol=0.05)
    assert per_band.min() >= ref.min() and per_band.max() <= ref.max()
    # the classes keep their order of brightness: calibration is one gain per band
    means = [got.images[ms.labels[got.ms_index] == c].mean() for c in range(len(ms.class_names))]
    assert means == sorted(means)
    # no reference: the bands stay on the MS scale (the matcher standardises each side itself)
    raw = same_target_rgb(ms, None, "pseudo-rgb", events=NULL_EVENTS)
    assert np.array_equal(raw.images, pseudo_rgb(ms))


def test_pairs_of_another_sensor_with_larger_patches_take_true_colour_to_their_size(tmp_path):
    """Paired RGB of a finer camera (2x the pixels of the MS patches): the unpaired MS samples'
    true colour is resampled to the pairs' size, so the positives are one stack."""
    paths = make_dataset(tmp_path)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    paired = load_folder(paths["rgb_paired"], "rgb", class_names=ms.class_names)
    half = paired.subset(np.arange(0, len(paired), 2))
    half.images = np.repeat(np.repeat(half.images, 2, axis=2), 2, axis=3)  # the same ground, finer pixels
    got = same_target_rgb(ms, half, "auto", events=NULL_EVENTS)
    assert got.source == "pairs+pseudo-rgb" and got.images.shape[-2:] == half.images.shape[-2:]
    assert sorted(got.ms_index.tolist()) == list(range(len(ms)))


def test_with_a_reference_the_pairs_too_take_its_colour_statistics(tmp_path):
    """Pairs show the MS samples' own places; the student's RGB set another place and light:
    given it as the reference, every row (pairs and true colour) takes its band statistics."""
    paths = make_dataset(tmp_path)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    paired = load_folder(paths["rgb_paired"], "rgb", class_names=ms.class_names)
    rgb = load_folder(paths["rgb_train"], "rgb", class_names=ms.class_names)
    rgb.images = np.clip(rgb.images * 0.8 + 30, 0, 255)  # another place: hazier, flatter light
    got = same_target_rgb(ms, paired, "auto", reference=rgb, events=NULL_EVENTS)
    mean = got.images.transpose(1, 0, 2, 3).reshape(3, -1).mean(1)
    assert np.allclose(mean, rgb.images.transpose(1, 0, 2, 3).reshape(3, -1).mean(1), rtol=0.05)
    plain = same_target_rgb(ms, paired, "auto", events=NULL_EVENTS)  # the matcher's positives: as they are
    assert not np.allclose(plain.images.mean(), got.images.mean(), rtol=0.05)


def test_another_cameras_band_mix_and_tone_curve_are_fitted_from_the_pairs():
    """A red that reaches the red edge and a concave tone curve: the fit on every MS band
    reproduces held-out pairs far better than scaling the true-colour bands."""
    from asymkd.data.same_target import fit_spectral, fit_to_pairs
    rng = np.random.default_rng(0)
    ms = rng.uniform(200, 3000, (40, 13, 8, 8))
    red, green, blue = ms[:, 3], ms[:, 2], ms[:, 1]
    camera = np.stack([0.75 * red + 0.25 * ms[:, 4], green, blue], 1)  # B05 leaks into red
    rgb = 255 * np.sqrt(camera / 3000)
    fit, held = np.arange(30), np.arange(30, 40)
    spectral = fit_spectral(ms[fit], rgb[fit])(ms[held])
    gain, offset = fit_to_pairs(ms[fit][:, [3, 2, 1]], rgb[fit])
    per_band = ms[held][:, [3, 2, 1]] * gain[None, :, None, None] + offset[None, :, None, None]
    err = np.sqrt(((spectral - rgb[held]) ** 2).mean())
    assert err < 0.25 * np.sqrt(((per_band - rgb[held]) ** 2).mean())
