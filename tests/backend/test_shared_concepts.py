"""Concepts that exist once and are read everywhere: classify's option defaults, class
colours, the class-set check."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from asymkd.classify import ClassifyOptions
from asymkd.commands import classify as classify_command
from asymkd.config import RunConfig
from asymkd.data.patches import MS_SET, check_known_classes
from asymkd.errors import DataError
from asymkd.palette import hex_to_rgb, is_hex_color, normalize_color
from asymkd.pipeline import load_rgb_train
from asymkd.train.pairing import check_classes
from tiny_data import write_rgb


def _classify_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    classify_command.add_arguments(parser)
    return parser.parse_args(["m.onnx", "r.tif", "--out", "o.gpkg", *extra])


def test_classify_cli_defaults_are_the_options_defaults():
    args = vars(_classify_args())
    shared = [f for f in dataclasses.fields(ClassifyOptions) if f.name in args]
    assert {"batch_size", "device", "min_valid", "threads", "tile", "bbox"} <= {f.name for f in shared}
    for field in shared:
        assert args[field.name] == field.default, field.name


def test_one_colour_parser_for_styles_rasters_and_model_files():
    assert normalize_color("#ABC") == "#aabbcc" and normalize_color("1a7a32ff") == "#1a7a32"
    assert normalize_color((255, 0, 0)) == "#ff0000" and normalize_color((1.0, 0.0, 0.0)) == "#ff0000"
    assert normalize_color("red") is None and normalize_color(("a", 1, 2)) is None
    assert hex_to_rgb("#ABC") == (170, 187, 204)  # the same forms as the model file's colours
    assert is_hex_color("#1A7A32") and not is_hex_color("#abc") and not is_hex_color("1a7a32")


def test_pairing_and_the_pipeline_refuse_an_unknown_class_with_one_message(tmp_path):
    for name in ("Forest", "Glacier"):
        write_rgb(tmp_path / "rgb" / name / f"{name}.png", np.zeros((3, 8, 8)))
    cfg = RunConfig()
    cfg.data.rgb = str(tmp_path / "rgb")
    with pytest.raises(DataError) as from_pipeline:
        load_rgb_train(cfg, ["Forest", "River"])
    with pytest.raises(DataError) as from_pairing:
        check_classes([0, 1], [0, 2], ["Forest", "Glacier", "River"])
    with pytest.raises(DataError) as expected:
        check_known_classes(["Glacier"], ["Forest", "River"], "WHERE", MS_SET)
    for got, where in ((from_pipeline, f"RGB folder {tmp_path / 'rgb'}"), (from_pairing, "the RGB set")):
        assert got.value.message == expected.value.message.replace("WHERE", where)
        assert got.value.hint == expected.value.hint.replace("WHERE", where)
    assert "WHERE with no sample in the MS set: Glacier (the MS set has: Forest, River)" in expected.value.message
    assert "add samples of these classes to the MS set" in expected.value.hint
