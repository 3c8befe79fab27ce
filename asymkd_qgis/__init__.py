"""AsymKD QGIS plugin: train an RGB scene classifier with a multispectral teacher and classify
map tiles, with the engine running in its own Python environment as a subprocess."""


def classFactory(iface):
    from .plugin import AsymKDPlugin
    return AsymKDPlugin(iface)
