"""The engine's tile style, drawn by real QGIS: uncertain tiles keep their class's colour,
faded and hatched."""

from __future__ import annotations

import subprocess

import pytest
from qgis.core import (
    QgsFeature,
    QgsGeometry,
    QgsMapRendererSequentialJob,
    QgsMapSettings,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor

from conftest import REPO, engine_python

TILES = [("A", 0), ("A", 1), ("B", 0), ("B", 1)]  # class_name, uncertain; 100 m side by side


def _engine_qml(tmp_path) -> str:
    python = engine_python()
    if not python.exists():
        pytest.skip(f"the engine environment {python} does not exist (run `make env`)")
    qml = tmp_path / "tiles.qml"
    code = ("import sys; from asymkd.classify.style import qml_text; "
            "open(sys.argv[1], 'w', encoding='utf-8').write(qml_text(['A', 'B'], ['#ff0000', '#0000ff']))")
    subprocess.run([str(python), "-c", code, str(qml)], check=True, cwd=REPO / "backend", timeout=120)
    return str(qml)


def _render(layer: QgsVectorLayer):
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setExtent(QgsRectangle(0, 0, 100 * len(TILES), 100))
    settings.setOutputSize(QSize(100 * len(TILES), 100))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage()


def test_uncertain_tiles_are_faded_and_hatched_in_their_class_colour(qgis_app, tmp_path):
    layer = QgsVectorLayer("Polygon?crs=EPSG:32632&field=class_name:string&field=uncertain:integer", "t", "memory")
    features = []
    for i, (name, uncertain) in enumerate(TILES):
        feature = QgsFeature(layer.fields())
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(i * 100, 0, i * 100 + 100, 100)))
        feature.setAttributes([name, uncertain])
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    message, ok = layer.loadNamedStyle(_engine_qml(tmp_path))
    assert ok, message
    image = _render(layer)
    seen = []
    for i in range(len(TILES)):  # the colours inside each tile, away from its outline
        seen.append({QColor(image.pixel(i * 100 + x, y)).getRgb()[:3] for x in range(20, 80) for y in range(20, 80)})
    solid_a, solid_b = seen[0], seen[2]
    assert len(solid_a) == 1 and len(solid_b) == 1  # certain: one solid colour
    (ra, ga, ba), (rb, gb, bb) = next(iter(solid_a)), next(iter(solid_b))
    assert ra > 200 and ga < 100 and ba < 100 and bb > 200 and rb < 100 and gb < 100  # the class colours
    for hatched, (name, _) in zip(seen[1::2], TILES[1::2], strict=True):
        light = max(hatched, key=sum)
        dark = min(hatched, key=sum)
        assert sum(dark) < 250, "no hatch lines"
        # the background between the hatch lines: the class colour, faded towards white
        assert light[0 if name == "A" else 2] > 240 and min(light) > 150 and sum(light) > sum(next(iter(seen[0])))
