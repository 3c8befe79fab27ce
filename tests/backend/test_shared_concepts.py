"""Concepts that exist once and are read everywhere: classify's option defaults, class
colours, the class-set check."""

from __future__ import annotations

import argparse
import dataclasses

from asymkd.classify import ClassifyOptions
from asymkd.commands import classify as classify_command


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
    from asymkd.palette import hex_to_rgb, is_hex_color, normalize_color
    assert normalize_color("#ABC") == "#aabbcc" and normalize_color("1a7a32ff") == "#1a7a32"
    assert normalize_color((255, 0, 0)) == "#ff0000" and normalize_color((1.0, 0.0, 0.0)) == "#ff0000"
    assert normalize_color("red") is None and normalize_color(("a", 1, 2)) is None
    assert hex_to_rgb("#ABC") == (170, 187, 204)  # the same forms as the model file's colours
    assert is_hex_color("#1A7A32") and not is_hex_color("#abc") and not is_hex_color("1a7a32")
