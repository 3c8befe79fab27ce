"""The "AsymKD" Processing provider: the engine's jobs as algorithms for the toolbox, batch
mode, the model designer and `qgis_process run asymkd:<name>`."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .. import paths


class AsymKDProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "asymkd"

    def name(self) -> str:
        return "AsymKD"

    def longName(self) -> str:
        return f"AsymKD {paths.plugin_version()}: cross-modal knowledge distillation for scene classification"

    def icon(self) -> QIcon:
        return QIcon(paths.icon_path())

    def svgIconPath(self) -> str:
        return paths.icon_path()

    def loadAlgorithms(self) -> None:
        from .algorithms import ALGORITHMS
        from .assessment import ALGORITHMS as ASSESSMENT
        for algorithm in (*ALGORITHMS, *ASSESSMENT):
            self.addAlgorithm(algorithm())

    def supportedOutputVectorLayerExtensions(self) -> list[str]:
        return ["gpkg"]  # the engine writes GeoPackages

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:
        return "gpkg"
