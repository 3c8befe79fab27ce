"""ONNX export: metadata inside the file, dynamic batch axis, parity with torch, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from asymkd import cli
from asymkd.errors import ConfigError, ModelFileError
from asymkd.export import export_onnx
from asymkd.models.backbones import SceneClassifier
from asymkd.models.files import load_model, save_model
from asymkd.models.metadata import ModelMeta
from asymkd.models.onnx_file import FORMAT_VERSION, META_KEY, VERSION_KEY, read_onnx_metadata
from asymkd.palette import class_color, class_colors

torch.set_num_threads(1)
CLASSES = ["Forest", "Water", "Urban"]


def _meta(**extra) -> ModelMeta:
    return ModelMeta(backbone="resnet18_w16", class_names=CLASSES, band_names=["R", "G", "B"],
                     mean=[100.0, 110.0, 90.0], std=[40.0, 35.0, 30.0], patch_size=32, gsd=10.0,
                     summary={"method": "asymkd", "epochs": 1}, metrics={"accuracy": 0.5}, **extra)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    net = SceneClassifier("resnet18_w16", 3, len(CLASSES))
    net.head.weight.data *= 20  # peaked probabilities, so argmax is stable
    return save_model(tmp_path_factory.mktemp("m") / "student", net, _meta(colors={"Water": "#0000ff"}))


@pytest.fixture(scope="module")
def exported(model_folder, tmp_path_factory):
    return export_onnx(model_folder, tmp_path_factory.mktemp("o") / "student.onnx", check_samples=16)


def _torch_probs(folder, x: np.ndarray) -> np.ndarray:
    model, meta = load_model(folder)
    mean = np.asarray(meta.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, -1, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy((x - mean) / std)), dim=1).numpy()


def test_metadata_travels_inside_the_file(exported, model_folder):
    proto = onnx.load(str(exported.path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[VERSION_KEY] == str(FORMAT_VERSION)
    meta = json.loads(props[META_KEY])
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["class_names"] == CLASSES
    assert meta["band_names"] == ["R", "G", "B"]
    assert meta["mean"] == [100.0, 110.0, 90.0] and meta["std"] == [40.0, 35.0, 30.0]
    assert meta["patch_size"] == 32 and meta["gsd"] == 10.0
    assert meta["backbone"] == "resnet18_w16" and meta["model_name"] == "student"
    assert meta["summary"] == {"method": "asymkd", "epochs": 1} and meta["metrics"] == {"accuracy": 0.5}
    assert meta["class_colors"][1] == "#0000ff"  # from meta.json colors
    assert len(meta["class_colors"]) == 3 and all(c.startswith("#") and len(c) == 7 for c in meta["class_colors"])
    assert meta["parity"]["max_abs_prob_diff"] <= 1e-4
    assert read_onnx_metadata(exported.path).class_names == CLASSES


def test_dynamic_batch_axis_and_parity_with_torch(exported, model_folder):
    sess = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    rng = np.random.default_rng(1)
    for n in (1, 5, 9):
        x = rng.uniform(0, 255, (n, 3, 32, 32)).astype(np.float32)
        probs, logits = sess.run(["probabilities", "logits"], {"image": x})
        assert probs.shape == (n, 3) and logits.shape == (n, 3)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert np.max(np.abs(probs - _torch_probs(model_folder, x))) <= 1e-4
    assert exported.max_abs_diff <= 1e-4 and exported.checked_samples == 16


def test_export_checks_on_given_patches(model_folder, tmp_path):
    data = np.random.default_rng(2).uniform(0, 255, (10, 3, 32, 32)).astype(np.float32)
    res = export_onnx(model_folder, tmp_path / "m.onnx", check_data=data)
    assert res.check_source == "data" and res.checked_samples == 10


def test_parity_failure_fails_export_and_writes_nothing(model_folder, tmp_path, monkeypatch):
    import asymkd.export as ex
    real = ex._to_onnx_bytes

    def perturbed(module, example, opset):  # export a slightly different network than torch runs
        clone = ex._Deployable.wrap(SceneClassifier("resnet18_w16", 3, 3), [0, 0, 0], [1, 1, 1])
        clone.model.load_state_dict(module.model.state_dict())
        clone.model.head.weight.data = clone.model.head.weight.data.flip(0)  # classes permuted
        clone.mean.copy_(module.mean)
        clone.inv_std.copy_(module.inv_std)
        return real(clone, example, opset)

    monkeypatch.setattr(ex, "_to_onnx_bytes", perturbed)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelFileError, match="disagree"):
        export_onnx(model_folder, out, check_samples=8)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_existing_output_unless_overwrite(model_folder, exported, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("old")
    with pytest.raises(ConfigError, match="already exists"):
        export_onnx(model_folder, out, check_samples=4)
    export_onnx(model_folder, out, check_samples=4, overwrite=True)
    assert read_onnx_metadata(out).num_classes == 3


def test_refuses_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff\xfe" * 10)
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        read_onnx_metadata(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not an ONNX model"):
        read_onnx_metadata(empty)


def test_refuses_onnx_without_metadata(exported, tmp_path):
    proto = onnx.load(str(exported.path))
    del proto.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(proto, str(plain))
    with pytest.raises(ModelFileError, match="without AsymKD metadata") as info:
        read_onnx_metadata(plain)
    assert "asymkd export" in info.value.hint


def test_refuses_newer_format_version(exported, tmp_path):
    proto = onnx.load(str(exported.path))
    for p in proto.metadata_props:
        if p.key == META_KEY:
            meta = json.loads(p.value)
            meta["format_version"] = FORMAT_VERSION + 1
            p.value = json.dumps(meta)
        if p.key == VERSION_KEY:
            p.value = str(FORMAT_VERSION + 1)
    newer = tmp_path / "newer.onnx"
    onnx.save(proto, str(newer))
    with pytest.raises(ModelFileError, match=f"version {FORMAT_VERSION + 1}") as info:
        read_onnx_metadata(newer)
    assert "update asymkd" in info.value.hint


def test_model_folder_instead_of_file_gets_a_hint(model_folder):
    with pytest.raises(ModelFileError, match="is a folder") as info:
        read_onnx_metadata(model_folder)
    assert "asymkd export" in info.value.hint


def test_colours_are_deterministic_and_accept_several_forms():
    names, given = ["a", "b", "c", "d"], ["#abc", (255, 0, 0), None, "zzz"]
    colors = class_colors(names, given)
    assert colors[:2] == ["#aabbcc", "#ff0000"]
    assert colors[2] == class_color("c") and colors[3] == class_color("d")  # the shared palette
    assert class_colors(names, given) == colors
    assert class_colors(["a"], {"a": (0.0, 0.5, 1.0)}) == ["#0080ff"]


def test_a_file_without_colours_gets_each_names_palette_colour(exported, tmp_path):
    # The fallback once coloured by class index, so one class had two colours: one in the
    # exported file's style, another in the report and the synthetic world's legend.
    proto = onnx.load(str(exported.path))
    prop = next(p for p in proto.metadata_props if p.key == META_KEY)
    meta = json.loads(prop.value)
    del meta["class_colors"]
    prop.value = json.dumps(meta)
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    assert read_onnx_metadata(tmp_path / "plain.onnx").class_colors == [class_color(n) for n in CLASSES]


def test_cli_export(model_folder, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert cli.main(["export", str(model_folder), "--out", str(out), "--check-samples", "4"]) == 0
    assert str(out) in capsys.readouterr().out
    assert cli.main(["export", str(model_folder), "--out", str(out), "--check-samples", "4"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_input_resize_lives_inside_the_exported_graph(tmp_path):
    torch.manual_seed(1)
    net = SceneClassifier("resnet18_w16", 3, len(CLASSES), input_size=48)
    net.head.weight.data *= 20
    folder = save_model(tmp_path / "student", net, _meta(input_size=48))
    result = export_onnx(folder, tmp_path / "student.onnx", check_samples=8)
    graph = onnx.load(str(result.path)).graph
    assert any(node.op_type == "Resize" for node in graph.node)
    # the graph takes 32 px tiles as before: classify needs nothing new
    x = np.random.default_rng(0).uniform(0, 255, (4, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.allclose(probs, _torch_probs(folder, x), atol=1e-4)


def test_a_matcher_folder_is_refused_by_name(tmp_path, capsys):
    folder = tmp_path / "matcher"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"kind": "matcher", "ms_backbone": "resnet18_w16"}))
    with pytest.raises(ModelFileError, match="holds a matcher model"):
        load_model(folder)
    assert cli.main(["export", str(folder), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "holds a matcher model" in capsys.readouterr().err


def test_the_input_casts_onnx_types_are_onnxs_own():
    # the cast is built without importing onnx, so its type codes are written out
    from asymkd.classify.infer import _ONNX_FLOAT, CASTABLE
    assert {str(d): code for d, code in CASTABLE.items()} == {
        "uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8,
        "uint16": onnx.TensorProto.UINT16, "int16": onnx.TensorProto.INT16}
    assert _ONNX_FLOAT == onnx.TensorProto.FLOAT
