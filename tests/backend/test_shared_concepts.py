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
