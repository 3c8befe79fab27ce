"""QGIS style for the tile layer: a categorized renderer on `class_name`, one fill colour
per class (the model's colours; tiles marked `uncertain` faded and hatched by data-defined
colours, so they keep their class's colour and legend entry), as a .qml file beside the
GeoPackage (QGIS loads a .qml with the layer file's name as the layer's default style) and
inside the GeoPackage's `layer_styles` table (the default style QGIS applies when the layer
is opened)."""

from __future__ import annotations

import datetime as _dt
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np

from ..palette import hex_to_rgb

FILL_ALPHA = 200  # see the imagery through the tiles
UNCERTAIN_ALPHA = 70  # uncertain tiles: the class colour faded ...
HATCH = "40,40,40,230"  # ... under a diagonal hatch
OUTLINE = "50,50,50,90"
UNCERTAIN = '"uncertain" = 1'


def _rgb(color: str, alpha: int) -> str:
    return ",".join(str(v) for v in (*hex_to_rgb(color), alpha))


def _fill_layer(sym: ET.Element, props: dict[str, str], color_expr: str) -> None:
    """A SimpleFill symbol layer whose colour is data-defined by `color_expr`."""
    layer = ET.SubElement(sym, "layer", {"class": "SimpleFill", "pass": "0", "locked": "0", "enabled": "1"})
    opts = ET.SubElement(layer, "Option", {"type": "Map"})
    for k, v in props.items():  # QGIS >= 3.26 reads Option, older versions read prop
        ET.SubElement(opts, "Option", {"type": "QString", "name": k, "value": v})
    for k, v in props.items():
        ET.SubElement(layer, "prop", {"k": k, "v": v})
    ddp = ET.SubElement(ET.SubElement(layer, "data_defined_properties"), "Option", {"type": "Map"})
    ET.SubElement(ddp, "Option", {"type": "QString", "name": "name", "value": ""})
    fill = ET.SubElement(ET.SubElement(ddp, "Option", {"type": "Map", "name": "properties"}),
                         "Option", {"type": "Map", "name": "fillColor"})
    ET.SubElement(fill, "Option", {"type": "bool", "name": "active", "value": "true"})
    ET.SubElement(fill, "Option", {"type": "QString", "name": "expression", "value": color_expr})
    ET.SubElement(fill, "Option", {"type": "int", "name": "type", "value": "3"})  # an expression
    ET.SubElement(ddp, "Option", {"type": "QString", "name": "type", "value": "collection"})


def _fill_symbol(parent: ET.Element, name: str, color: str) -> None:
    """The class colour; where the tile is `uncertain`, faded and hatched."""
    sym = ET.SubElement(parent, "symbol", {"type": "fill", "name": name, "alpha": "1",
                                           "clip_to_extent": "1", "force_rhr": "0"})
    common = {"outline_width": "0.1", "outline_width_unit": "MM", "joinstyle": "miter", "offset": "0,0",
              "offset_unit": "MM"}
    solid, faded = _rgb(color, FILL_ALPHA), _rgb(color, UNCERTAIN_ALPHA)
    _fill_layer(sym, {"color": solid, "style": "solid", "outline_color": OUTLINE, "outline_style": "solid",
                      **common}, f"if({UNCERTAIN}, '{faded}', '{solid}')")
    _fill_layer(sym, {"color": HATCH, "style": "b_diagonal", "outline_color": "0,0,0,0", "outline_style": "no",
                      **common}, f"if({UNCERTAIN}, '{HATCH}', '0,0,0,0')")


def qml_text(class_names: Sequence[str], colors: Sequence[str], attr: str = "class_name") -> str:
    root = ET.Element("qgis", {"version": "3.22.0", "styleCategories": "Symbology"})
    renderer = ET.SubElement(root, "renderer-v2", {"type": "categorizedSymbol", "attr": attr,
                                                   "symbollevels": "0", "enableorderby": "0",
                                                   "forceraster": "0"})
    cats = ET.SubElement(renderer, "categories")
    syms = ET.SubElement(renderer, "symbols")
    for i, (name, color) in enumerate(zip(class_names, colors, strict=True)):
        ET.SubElement(cats, "category", {"value": str(name), "label": str(name), "symbol": str(i), "render": "true"})
        _fill_symbol(syms, str(i), color)
    ET.SubElement(root, "layerOpacity").text = "1"
    ET.SubElement(root, "layerGeometryType").text = "2"  # polygon
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def embed_style(gpkg: Path, layer: str, qml: str, name: str = "asymkd classes") -> None:
    """Store the style as the layer's default in the GeoPackage `layer_styles` table (the
    table QGIS itself writes when a style is saved to the database)."""
    from ..fileio import write_gpkg_layer
    fields = {
        "f_table_catalog": "", "f_table_schema": "", "f_table_name": layer, "f_geometry_column": "geom",
        "styleName": name, "styleQML": qml, "styleSLD": "", "useAsDefault": 1,
        "description": "categorized by class, written by asymkd classify", "owner": "", "ui": "",
        "update_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }
    data = [np.array([v], dtype=np.int32 if isinstance(v, int) else object) for v in fields.values()]
    write_gpkg_layer(gpkg, None, data, list(fields), layer="layer_styles", append=True)
