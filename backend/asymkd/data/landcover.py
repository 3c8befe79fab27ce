"""Land cover of the synthetic world, as a Sentinel-2-like sensor sees it.

Every patch is built as surface reflectance from a few *materials* (each a 13-band spectral
signature) laid out by a class-specific texture (field stripes, canopy blobs, road lines,
building blocks, meandering rivers...), then passed through a simple atmosphere (gain,
wavelength-dependent path radiance and haze) and the sensor (20 m / 60 m bands blurred, noise).

The classes are built so that MS separates what RGB alone confuses: the four vegetation
classes share one visible colour (they differ in red edge, NIR and SWIR) and water shares
its visible colour with dark forest (they differ in NIR). Texture still gives RGB some signal.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from .bands import SENTINEL2_EUROSAT, SENTINEL2_WAVELENGTH_NM, true_colour_indices

CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake"]
BAND_NAMES = list(SENTINEL2_EUROSAT)
RGB_MAX_DN = 2750.0  # EuroSAT JPEGs: 8-bit = DN * 255 / 2750 (fitted on the real pairs), clipped

# -- spectra ---------------------------------------------------------------------------
# Surface reflectance per material, bands in wavelength order (B10 is the cirrus band: it
# sees the atmosphere, not the ground, so it is 0 here and set by the atmosphere model).
_WAVE_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
               "B11", "B12"]
_MATERIALS_BY_WAVE: dict[str, list[float]] = {
    # vegetation: one visible colour, different red edge / NIR plateau / SWIR (water content)
    "grass":     [.030, .040, .075, .050, .120, .300, .380, .400, .410, .400, 0, .200, .090],
    "crop":      [.030, .040, .075, .050, .140, .350, .450, .490, .500, .480, 0, .240, .110],
    "crop_row":  [.032, .042, .072, .056, .120, .220, .270, .290, .300, .300, 0, .310, .200],
    "herb":      [.030, .040, .075, .050, .105, .210, .260, .280, .290, .285, 0, .310, .190],
    "dry_herb":  [.034, .044, .078, .056, .115, .190, .225, .240, .250, .250, 0, .340, .230],
    "orchard":   [.030, .040, .075, .050, .115, .260, .320, .340, .350, .340, 0, .270, .150],
    "inter_row": [.034, .044, .074, .055, .125, .240, .280, .295, .305, .300, 0, .330, .210],
    # dark group: forest and water look alike in RGB, not in NIR/SWIR
    "forest":    [.020, .030, .045, .028, .075, .200, .260, .280, .290, .280, 0, .130, .055],
    "water":     [.034, .035, .048, .030, .022, .014, .011, .009, .008, .006, 0, .004, .002],
    "river":     [.038, .040, .054, .036, .030, .020, .015, .012, .011, .008, 0, .005, .003],
    # built-up: flat spectra
    "asphalt":   [.070, .075, .085, .095, .100, .105, .110, .115, .115, .115, 0, .130, .120],
    "concrete":  [.160, .180, .200, .220, .230, .235, .240, .250, .250, .250, 0, .290, .260],
    "roof_red":  [.050, .060, .080, .170, .210, .230, .250, .260, .265, .260, 0, .310, .260],
    "roof_metal": [.220, .240, .260, .270, .275, .280, .285, .290, .290, .290, 0, .260, .220],
    "soil":      [.080, .100, .130, .170, .190, .210, .230, .250, .260, .260, 0, .330, .270],
}
_TO_EUROSAT = [_WAVE_ORDER.index(b) for b in BAND_NAMES]
MATERIALS: dict[str, np.ndarray] = {k: np.asarray(v, np.float64)[_TO_EUROSAT]
                                    for k, v in _MATERIALS_BY_WAVE.items()}
_WAVELENGTH = np.array([SENTINEL2_WAVELENGTH_NM[b] for b in BAND_NAMES], np.float64)
# Top-of-atmosphere path radiance (Rayleigh-like, strongest in blue), as in L1C EuroSAT.
_PATH = 0.055 * (490.0 / _WAVELENGTH) ** 3
_B09, _B10 = BAND_NAMES.index("B09"), BAND_NAMES.index("B10")
_BLUR = {BAND_NAMES.index(b): 2 for b in ("B05", "B06", "B07", "B8A", "B11", "B12")}  # 20 m
_BLUR.update({BAND_NAMES.index(b): 6 for b in ("B01", "B09", "B10")})  # 60 m


@dataclasses.dataclass(frozen=True)
class Place:
    """Acquisition conditions of a set of patches (MS and RGB come from different places)."""

    gain: tuple[float, float]  # illumination (sun angle, slope) multiplies the surface
    haze: tuple[float, float]  # extra path radiance, relative to the clear-sky path
    noise: float  # sensor noise, reflectance units


MS_PLACE = Place(gain=(0.93, 1.07), haze=(0.0, 0.3), noise=0.003)
RGB_PLACE = Place(gain=(0.86, 1.14), haze=(0.1, 0.7), noise=0.004)


# -- textures --------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return yy, xx


def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Gaussian-correlated noise (correlation length `scale` px), zero mean, unit std."""
    white = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    out = np.fft.ifft2(np.fft.fft2(white) * np.exp(-2.0 * (np.pi * scale) ** 2 * k2)).real
    out -= out.mean()
    return out / (out.std() + 1e-9)


def _soft(x: np.ndarray, sharpness: float = 4.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-sharpness * x))


def stripes(rng: np.random.Generator, size: int, period: float, duty: float = 0.5,
            angle: float | None = None) -> np.ndarray:
    """Parallel rows (crop rows, ploughing) as a soft 0/1 mask."""
    yy, xx = _grid(size)
    a = rng.uniform(0, np.pi) if angle is None else angle
    s = (xx * np.cos(a) + yy * np.sin(a)) / period + rng.uniform(0, 1)
    wave = np.cos(2 * np.pi * s)
    return _soft(wave - np.cos(np.pi * duty), 6.0)


def line_distance(rng: np.random.Generator, size: int, meander: float = 0.0) -> np.ndarray:
    """Distance (px) to a line crossing the patch near its centre (meandering if `meander`)."""
    yy, xx = _grid(size)
    a = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    across = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    if meander:
        wavelength = rng.uniform(1.0, 2.0) * size
        across = across - meander * np.sin(2 * np.pi * along / wavelength + rng.uniform(0, 2 * np.pi))
    return np.abs(across)


def band_mask(distance: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased band of `width` px around a line (road, river)."""
    return np.clip(width / 2 - distance + 0.5, 0.0, 1.0)


def parcels(rng: np.random.Generator, size: int, cuts: int) -> np.ndarray:
    """Integer parcel id per pixel from `cuts` straight field boundaries."""
    yy, xx = _grid(size)
    ids = np.zeros((size, size), np.int64)
    for k in range(cuts):
        a = rng.uniform(0, np.pi)
        c = rng.uniform(0.2, 0.8, 2) * size
        side = ((xx - c[0]) * np.cos(a) + (yy - c[1]) * np.sin(a)) > 0
        ids += side.astype(np.int64) << k
    return ids


def rectangles(rng: np.random.Generator, size: int, count: int, lo: int, hi: int) -> Iterator[tuple[slice, slice]]:
    for _ in range(count):
        h, w = rng.integers(lo, hi + 1, 2)
        y, x = rng.integers(0, max(1, size - h + 1)), rng.integers(0, max(1, size - w + 1))
        yield slice(int(y), int(y + h)), slice(int(x), int(x + w))


# -- composition -----------------------------------------------------------------------
class Canvas:
    """Surface reflectance (13, H, W) painted material by material."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng = rng
        self.size = size
        self._sigs: dict[str, np.ndarray] = {}
        self.cube = np.zeros((len(BAND_NAMES), size, size))

    def sig(self, name: str) -> np.ndarray:
        """The material's signature with this patch's natural variation (same inside a patch)."""
        if name not in self._sigs:
            overall = 1.0 + 0.06 * self.rng.standard_normal()
            per_band = 1.0 + 0.025 * self.rng.standard_normal(len(BAND_NAMES))
            self._sigs[name] = MATERIALS[name] * overall * per_band
        return self._sigs[name]

    def _layer(self, name: str, texture: np.ndarray | None, amp: float) -> np.ndarray:
        sig = self.sig(name)[:, None, None]
        if texture is None:
            return np.broadcast_to(sig, self.cube.shape)
        return sig * np.clip(1.0 + amp * texture, 0.2, 2.0)[None]

    def fill(self, name: str, texture: np.ndarray | None = None, amp: float = 0.0) -> "Canvas":
        self.cube = np.array(self._layer(name, texture, amp))
        return self

    def paint(self, name: str, mask: np.ndarray, texture: np.ndarray | None = None,
              amp: float = 0.0) -> "Canvas":
        m = np.clip(mask, 0.0, 1.0)[None]
        self.cube = self.cube * (1.0 - m) + self._layer(name, texture, amp) * m
        return self

    def noise(self, scale: float) -> np.ndarray:
        return smooth_noise(self.rng, self.size, scale)


def _veg_background(c: Canvas, choices: tuple[str, ...]) -> None:
    name = choices[int(c.rng.integers(0, len(choices)))]
    c.fill(name, c.noise(c.rng.uniform(2, 5)), 0.08)


def _annual_crop(c: Canvas) -> None:
    ids = parcels(c.rng, c.size, int(c.rng.integers(1, 4)))
    c.fill("crop", c.noise(4), 0.04)
    for pid in np.unique(ids):
        mask = (ids == pid).astype(np.float64)
        rows = stripes(c.rng, c.size, c.rng.uniform(2.5, 6.0), c.rng.uniform(0.3, 0.6))
        c.paint("crop_row", mask * rows * c.rng.uniform(0.3, 0.8))


def _forest(c: Canvas) -> None:
    c.fill("forest", c.noise(c.rng.uniform(0.8, 1.6)), 0.22)  # crowns and their shadows
    if c.rng.random() < 0.3:  # a clearing
        c.paint("grass", _soft(c.noise(5) - 1.2, 3.0))


def _herbaceous(c: Canvas) -> None:
    c.fill("herb", c.noise(c.rng.uniform(1.5, 4.0)), 0.10)
    c.paint("dry_herb", _soft(c.noise(c.rng.uniform(2, 5)), 2.0) * 0.7)
    c.paint("forest", _soft(c.noise(1.2) - 1.8, 4.0) * 0.6)  # shrubs


def _highway(c: Canvas) -> None:
    _veg_background(c, ("herb", "dry_herb", "crop_row"))
    d = line_distance(c.rng, c.size)
    width = c.rng.uniform(2.0, 4.0)
    c.paint("concrete", band_mask(d, width + 2.0) * 0.4)  # shoulders
    c.paint("asphalt", band_mask(d, width))
    if c.rng.random() < 0.35:  # a side road
        c.paint("asphalt", band_mask(line_distance(c.rng, c.size), c.rng.uniform(1.0, 2.0)))


def _industrial(c: Canvas) -> None:
    c.fill("concrete", c.noise(3), 0.1)
    c.paint("asphalt", _soft(c.noise(4), 2.0))
    for name in ("roof_metal", "concrete", "roof_metal", "asphalt", "roof_red"):
        for ys, xs in rectangles(c.rng, c.size, int(c.rng.integers(1, 3)), c.size // 6, c.size // 2):
            mask = np.zeros((c.size, c.size))
            mask[ys, xs] = 1.0
            c.paint(name, mask)
    c.paint("grass", _soft(c.noise(2) - 1.5, 3.0) * 0.8)


def _residential(c: Canvas) -> None:
    c.fill("grass", c.noise(1.5), 0.12)
    period = c.rng.uniform(6.0, 10.0)
    angle = c.rng.uniform(0, np.pi / 2)
    streets = np.maximum(stripes(c.rng, c.size, period, 0.22, angle),
                         stripes(c.rng, c.size, period, 0.22, angle + np.pi / 2))
    houses = _soft(c.noise(0.7) + 0.3, 4.0) * (1.0 - streets)
    roof = "roof_red" if c.rng.random() < 0.6 else "concrete"
    c.paint(roof, houses * 0.85)
    c.paint("forest", _soft(c.noise(1.0) - 1.3, 4.0) * (1.0 - streets) * 0.8)  # garden trees
    c.paint("asphalt", streets)


def _pasture(c: Canvas) -> None:
    c.fill("grass", c.noise(c.rng.uniform(3.0, 7.0)), 0.07)
    if c.rng.random() < 0.4:  # a hedgerow along a field edge
        c.paint("forest", band_mask(line_distance(c.rng, c.size), c.rng.uniform(1.0, 2.0)) * 0.8)
    c.paint("herb", _soft(c.noise(3.0) - 1.0, 2.0) * 0.5)


def _permanent_crop(c: Canvas) -> None:
    c.fill("inter_row", c.noise(3), 0.05)
    period = c.rng.uniform(2.5, 5.0)
    angle = c.rng.uniform(0, np.pi)
    rows = stripes(c.rng, c.size, period, c.rng.uniform(0.35, 0.6), angle)
    trees = stripes(c.rng, c.size, period * c.rng.uniform(0.8, 1.5), 0.6, angle + np.pi / 2)
    c.paint("orchard", rows * (0.5 + 0.5 * trees))


def _river(c: Canvas) -> None:
    _veg_background(c, ("grass", "forest"))
    d = line_distance(c.rng, c.size, meander=c.rng.uniform(1.0, 0.12 * c.size))
    c.paint("river", band_mask(d, c.rng.uniform(3.0, 0.25 * c.size)), c.noise(3), 0.06)


def _sea_lake(c: Canvas) -> None:
    c.fill("water", c.noise(c.rng.uniform(1.5, 5.0)), 0.10)  # waves, sediment, glint
    if c.rng.random() < 0.3:  # a shore in one corner
        yy, xx = _grid(c.size)
        a = c.rng.uniform(0, 2 * np.pi)
        d = (xx - c.size / 2) * np.cos(a) + (yy - c.size / 2) * np.sin(a) - c.rng.uniform(0.3, 0.45) * c.size
        c.paint(["forest", "grass"][int(c.rng.integers(0, 2))], np.clip(d + 0.5 + 2 * c.noise(4), 0, 1))


RENDERERS: dict[str, Callable[[Canvas], None]] = {
    "AnnualCrop": _annual_crop, "Forest": _forest, "HerbaceousVegetation": _herbaceous,
    "Highway": _highway, "Industrial": _industrial, "Pasture": _pasture,
    "PermanentCrop": _permanent_crop, "Residential": _residential, "River": _river,
    "SeaLake": _sea_lake,
}


def _box_blur(img: np.ndarray, width: int) -> np.ndarray:
    """Separable box filter (a coarser band's pixel footprint), edges replicated."""
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (width // 2, width - 1 - width // 2)
        p = np.pad(out, pad, mode="edge")
        c = np.cumsum(p, axis=axis)
        c = np.insert(c, 0, 0.0, axis=axis)
        n = out.shape[axis]
        out = (np.take(c, np.arange(width, width + n), axis=axis)
               - np.take(c, np.arange(0, n), axis=axis)) / width
    return out


def render_patch(class_name: str, rng: np.random.Generator, size: int, place: Place) -> np.ndarray:
    """One MS patch as uint16 DN (reflectance x 10000), shape (13, size, size)."""
    canvas = Canvas(rng, size)
    RENDERERS[class_name](canvas)
    gain = rng.uniform(*place.gain)
    haze = rng.uniform(*place.haze)
    toa = canvas.cube * gain
    toa[_B09] *= 0.35  # water-vapour absorption
    toa += (_PATH * (1.0 + haze))[:, None, None]
    toa[_B10] = 0.0008 + 0.0004 * haze + 0.0002 * smooth_noise(rng, size, 6)
    for band, width in _BLUR.items():
        toa[band] = _box_blur(toa[band], width)
    toa += place.noise * rng.standard_normal(toa.shape)
    return np.clip(np.rint(toa * 10000.0), 1, 65535).astype(np.uint16)


def render_rgb(ms: np.ndarray, band_names: list[str] = BAND_NAMES) -> np.ndarray:
    """8-bit true colour (3, H, W) from MS DN the way EuroSAT's JPEGs were made (B04/B03/B02
    x 255/2750). Values are kept >= 1 so 0 stays free for nodata in scenes."""
    r, g, b = true_colour_indices(band_names)
    rgb = ms[[r, g, b]].astype(np.float64) * (255.0 / RGB_MAX_DN)
    return np.clip(np.rint(rgb), 1, 255).astype(np.uint8)


# -- another RGB sensor ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RgbSensor:
    """An RGB camera other than Sentinel-2's true colour: what an analyst's orthophoto or
    aerial mosaic is. It sees the same ground through broader bands (red reaching into the
    red edge), its own white balance and tone curve, at `scale` times finer pixels."""

    name: str
    response: dict[str, dict[str, float]]  # output channel R/G/B -> {MS band: weight}
    black: tuple[float, float, float]       # top-of-atmosphere reflectance shown as 0 (haze removed)
    white: tuple[float, float, float]       # ... and as 255, per channel
    gamma: float                            # tone curve exponent (1/2.2 for an sRGB-like camera)
    scale: int                              # pixels per MS pixel along each axis
    noise: float                            # 8-bit sensor noise at the fine pixels (sd)

    def gsd(self, ms_gsd: float) -> float:
        return ms_gsd / self.scale


AERIAL = RgbSensor(
    "aerial",
    response={"R": {"B04": 0.75, "B05": 0.15, "B03": 0.10},
              "G": {"B02": 0.15, "B03": 0.70, "B04": 0.15},
              "B": {"B01": 0.20, "B02": 0.70, "B03": 0.10}},
    black=(0.05, 0.06, 0.08), white=(0.28, 0.28, 0.30), gamma=1 / 1.8, scale=2, noise=2.0)
# `synth --rgb-sensor`: "sentinel2" is the MS sensor's own true colour (EuroSAT's RGB)
RGB_SENSORS = {"sentinel2": None, "aerial": AERIAL}


def _upsample(image: np.ndarray, scale: int) -> np.ndarray:
    """(C, H, W) float to (C, H*scale, W*scale), bilinear with pixel centres aligned."""
    if scale == 1:
        return image
    c, h, w = image.shape
    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n * scale) + 0.5) / scale - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, n - 1), pos - lo
    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    rows = image[:, y0] * (1 - fy)[None, :, None] + image[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def sensor_rgb(ms: np.ndarray, sensor: RgbSensor | None, rng: np.random.Generator | None = None,
               band_names: list[str] = BAND_NAMES) -> np.ndarray:
    """8-bit RGB (3, H*scale, W*scale) of the target an MS patch (DN) shows, as `sensor` sees
    it (None: Sentinel-2's own true colour, `render_rgb`). Values stay >= 1 (0 is nodata)."""
    if sensor is None:
        return render_rgb(ms, band_names)
    toa = ms.astype(np.float64) / 10000.0
    channels = [sum(w * toa[band_names.index(b)] for b, w in sensor.response[ch].items()) for ch in "RGB"]
    fine = _upsample(np.stack(channels), sensor.scale)
    black, white = (np.asarray(v)[:, None, None] for v in (sensor.black, sensor.white))
    out = 255.0 * np.clip((fine - black) / (white - black), 0.0, 1.0) ** sensor.gamma
    if rng is not None and sensor.noise:
        out = out + sensor.noise * rng.standard_normal(out.shape)
    return np.clip(np.rint(out), 1, 255).astype(np.uint8)


# -- a quick separability check --------------------------------------------------------
def patch_mean_features(images: np.ndarray) -> np.ndarray:
    """Per-band patch means (N, C) of (N, C, H, W) images."""
    return images.reshape(images.shape[0], images.shape[1], -1).mean(-1)


def nearest_mean_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                          test_y: np.ndarray) -> float:
    """Nearest class mean on features standardised by the pooled within-class std."""
    classes = np.unique(train_y)
    means = np.stack([train_x[train_y == k].mean(0) for k in classes])
    within = np.concatenate([train_x[train_y == k] - means[i] for i, k in enumerate(classes)])
    scale = within.std(0) + 1e-9
    d = (((test_x[:, None, :] - means[None]) / scale) ** 2).sum(-1)
    return float((classes[d.argmin(1)] == test_y).mean())
