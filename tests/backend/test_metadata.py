"""Typed model metadata: meta.json and ONNX metadata read into ModelMeta / MatcherMeta and
written back in the same schema; the ONNX reader on its own; one held-out scores rule."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from asymkd.errors import ModelFileError
from asymkd.export import build_metadata
from asymkd.layout import META, WEIGHTS
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import load_model, read_meta, save_model, save_state
from asymkd.models.metadata import MatcherMeta, ModelMeta, validate_meta
from asymkd.models.onnx_file import FORMAT_VERSION, META_KEY, parse_metadata
from asymkd.palette import class_color
from asymkd.scores import held_out, split_name

# meta.json of a student as `distill` writes it, with keys no reader knows
STUDENT = {"backbone": "resnet18_w16", "class_names": ["Forest", "River"], "band_names": ["R", "G", "B"],
           "in_chans": 3, "num_classes": 2, "mean": [100.0, 110.0, 90.0], "std": [40.0, 35.0, 30.0],
           "patch_size": 32, "input_size": 0, "gsd": 10.0, "kind": "student", "role": "baseline",
           "weights_source": "scratch", "summary": {"epochs": 3, "backbone": "resnet18_w16"},
           "metrics": {"test": {"overall_accuracy": 0.9, "macro_f1": 0.88}}, "notes": ["hand-added"]}
MATCHER = {"kind": "matcher", "ms_backbone": "resnet18_w16", "rgb_backbone": "resnet18_w16", "ms_chans": 2,
           "embed_dim": 16, "ms_mean": [0.0, 1.0], "ms_std": [1.0, 2.0], "rgb_mean": [1.0, 2.0, 3.0],
           "rgb_std": [1.0, 1.0, 1.0], "band_names": ["B4", "B8"], "summary": {"pairs": 4}}


def test_meta_json_round_trips_unchanged_with_its_unknown_keys():
    meta = ModelMeta.from_json(STUDENT, "s/meta.json")
    assert meta.to_json() == STUDENT
    assert ModelMeta.from_json(meta.to_json(), "s/meta.json") == meta
    assert meta.extra == {"notes": ["hand-added"]} and meta.role == "baseline"
    assert (meta.in_chans, meta.num_classes, meta.gsd) == (3, 2, 10.0)


def test_a_known_key_of_another_type_is_not_used_but_kept_as_read():
    doc = {**STUDENT, "summary": "edited", "kind": None}
    meta = ModelMeta.from_json(doc, "m")
    assert meta.summary is None and meta.kind is None
    assert meta.to_json() == doc


def test_an_older_meta_json_loads_and_gains_only_the_derived_fields():
    old = {k: v for k, v in STUDENT.items() if k not in ("in_chans", "num_classes", "input_size", "kind")}
    meta = ModelMeta.from_json(old, "old/meta.json")
    assert meta.kind is None and meta.input_size == 0
    assert meta.to_json() == {**old, "in_chans": 3, "num_classes": 2, "input_size": 0}


@pytest.mark.parametrize("change,field", [
    ({"mean": [1.0]}, "mean"), ({"std": [1.0, 0.0, 1.0]}, "std"), ({"patch_size": 10 ** 9}, "patch_size"),
    ({"gsd": -1.0}, "gsd"), ({"in_chans": 4}, "in_chans"), ({"class_names": ["A", "A"]}, "class_names"),
    ({"backbone": ""}, "backbone"), ({"output": "scores"}, "output"),
])
def test_a_bad_field_is_a_model_file_error_naming_it(change, field):
    with pytest.raises(ModelFileError) as typed:
        ModelMeta.from_json({**STUDENT, **change}, "x/meta.json")
    assert f"'{field}'" in typed.value.message and "x/meta.json" in typed.value.message and typed.value.hint
    with pytest.raises(ModelFileError) as checked:  # the one check, the same words
        validate_meta({**STUDENT, **change}, "x/meta.json")
    assert (typed.value.message, typed.value.hint) == (checked.value.message, checked.value.hint)


def test_a_missing_field_is_named():
    with pytest.raises(ModelFileError, match="lacks 'patch_size'"):
        ModelMeta.from_json({k: v for k, v in STUDENT.items() if k != "patch_size"}, "m")
    with pytest.raises(ModelFileError, match="not a JSON object"):
        ModelMeta.from_json([STUDENT], "m")


def test_save_model_takes_backbone_and_input_size_from_the_model(tmp_path):
    net = SceneClassifier("resnet18_w16", 3, 2, input_size=48)
    meta = ModelMeta.from_json({**STUDENT, "backbone": "other", "input_size": 0}, "m")
    folder = save_model(tmp_path / "student", net, meta)
    doc = json.loads((folder / META).read_text())
    assert doc == {**STUDENT, "input_size": 48}
    assert read_meta(folder) == ModelMeta.from_json(doc, "m")
    model, loaded = load_model(folder)
    assert loaded.input_size == model.input_size == 48 and loaded.extra == {"notes": ["hand-added"]}


def test_onnx_metadata_is_read_into_the_same_type():
    meta = ModelMeta.from_json({**STUDENT, "colors": {"River": "#0000ff"}}, "m")
    doc = build_metadata(meta, parity={"max_abs_prob_diff": 0.0})
    assert doc["format_version"] == FORMAT_VERSION and "kind" not in doc and "colors" not in doc
    read = parse_metadata({META_KEY: json.dumps(doc)}, "m.onnx")
    assert read.class_colors == [class_color("Forest"), "#0000ff"]
    assert (read.class_names, read.mean, read.patch_size, read.gsd) == (meta.class_names, meta.mean, 32, 10.0)
    assert read.summary == meta.summary and read.extra["parity"] == {"max_abs_prob_diff": 0.0}
    assert read.to_json()["model_name"] == "model"
    del doc["class_colors"]  # an older file: each name's palette colour
    assert parse_metadata({META_KEY: json.dumps(doc)}, "m.onnx").class_colors == [class_color("Forest"),
                                                                                   class_color("River")]
    with pytest.raises(ModelFileError, match="'class_colors'"):
        parse_metadata({META_KEY: json.dumps({**doc, "class_colors": ["#000000"]})}, "m.onnx")


def test_classify_reads_models_without_the_exporter_or_torch():
    code = ("import sys, asymkd.classify.run; "
            "print([m for m in ('asymkd.export', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_matcher_meta_round_trips_and_checks_its_fields():
    meta = MatcherMeta.from_json(MATCHER, "m/meta.json")
    assert meta.to_json() == MATCHER and MatcherMeta.from_json(meta.to_json(), "m") == meta
    older = {k: v for k, v in MATCHER.items() if k != "kind"}
    assert MatcherMeta.from_json(older, "m").to_json() == older  # no kind added
    for change, field in (({"ms_mean": [0.0]}, "ms_mean"), ({"ms_chans": 0}, "ms_chans"),
                          ({"embed_dim": "16"}, "embed_dim"), ({"rgb_backbone": None}, "rgb_backbone")):
        with pytest.raises(ModelFileError, match=f"'{field}'") as info:
            MatcherMeta.from_json({**MATCHER, **change}, "m/meta.json", hint="run the matcher")
        assert "m/meta.json" in info.value.message and info.value.hint == "run the matcher"


def test_a_damaged_matcher_field_is_exit_2_naming_it(tmp_path):
    from asymkd.train.matcher import Matcher, load_matcher
    folder = tmp_path / "matcher"
    folder.mkdir()
    torch.manual_seed(0)
    save_state(folder / WEIGHTS, Matcher("resnet18_w16", "resnet18_w16", 2, 16).state_dict())
    (folder / META).write_text(json.dumps(MATCHER))
    model, meta = load_matcher(folder)
    assert meta.ms_mean == [0.0, 1.0] and model.ms.proj[-1].out_features == 16
    (folder / META).write_text(json.dumps({**MATCHER, "ms_std": [1.0, -1.0]}))
    with pytest.raises(ModelFileError, match="'ms_std'") as info:
        load_matcher(folder)
    assert "asymkd matcher --run" in info.value.hint


def test_held_out_scores_are_the_test_scores_else_the_validation_scores():
    test, val = {"overall_accuracy": 0.9, "macro_f1": 0.8}, {"overall_accuracy": 0.7, "macro_f1": 0.6}
    assert held_out({"test": test, "val": val}) == ("test", test)
    assert held_out({"test": None, "val": val}) == ("val", val)
    assert held_out({"test": {"overall_accuracy": 0.9}, "val": val}) == ("val", val)  # a damaged entry
    assert held_out({"val": None}) is None and held_out({}) is None
    assert (split_name("test"), split_name("val")) == ("test", "validation")
