"""Matcher positives: explicit pairs, and calibrated pseudo-RGB for MS samples without one."""

from __future__ import annotations

import numpy as np

from asymkd import config as config_mod
from asymkd.data.patches import load_folder
from asymkd.events import NULL_EVENTS
from asymkd.train.matcher import positive_pairs, pseudo_rgb
from tiny_data import make_dataset


def test_unpaired_ms_samples_join_as_pseudo_rgb_on_the_rgb_scale(tmp_path):
    paths = make_dataset(tmp_path)
    ms = load_folder(paths["ms"], "ms", bands="sentinel2")
    paired = load_folder(paths["rgb_paired"], "rgb", class_names=ms.class_names)
    half = paired.subset(np.arange(0, len(paired), 2))
    cfg = config_mod.RunConfig()
    ms_idx, images, source = positive_pairs(cfg, ms, half, NULL_EVENTS)
    assert source == "pairs+pseudo-rgb"
    assert sorted(ms_idx.tolist()) == list(range(len(ms)))  # every MS sample has a positive
    n_pairs = len(half)
    # the added pseudo-RGB is on the paired RGB's scale (8-bit), not the MS reflectance scale
    added = images[n_pairs:]
    assert abs(float(added.mean()) - float(half.images.mean())) < 0.25 * float(half.images.mean())
    assert float(pseudo_rgb(ms).mean()) > 5 * float(added.mean())
    # explicit pairs only, when asked
    cfg.matcher.positives = "pairs"
    ms_idx, images, source = positive_pairs(cfg, ms, half, NULL_EVENTS)
    assert source == "pairs" and len(ms_idx) == n_pairs
