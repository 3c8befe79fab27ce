"""Band mapping and the prefetching tile reader.

A background thread reads row strips of tiles with one rasterio window read per strip
(up to `max_strip_tiles` tiles wide), cuts them into tiles, drops tiles with too few
valid pixels, and hands float32 batches to the consumer through a small queue, so reads
overlap inference and memory stays bounded (queue size x batch size tiles).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from ..data.bands import TRUE_COLOUR_NM, wavelength_nm
from ..errors import ConfigError, DataError
from .area import TilePlan
from .grid import Grid, lon_wrapped_crs

_COLOUR_INTERP = {"R": ColorInterp.red, "G": ColorInterp.green, "B": ColorInterp.blue}


def resolve_bands(src, band_names: Sequence[str], bands: Sequence[int] | str | None = None) -> tuple[list[int], str]:
    """1-based raster bands feeding the model's bands, in the model's order, and how they
    were chosen: explicit, band descriptions, colour interpretation, or band order."""
    need = len(band_names)
    wanted = ", ".join(band_names)
    if bands is not None:
        if isinstance(bands, str):
            try:
                bands = [int(b) for b in bands.split(",") if b.strip()]
            except ValueError as exc:
                raise ConfigError(f"--bands '{bands}' is not a list of band numbers",
                                  "write e.g. --bands 1,2,3") from exc
        bands = [int(b) for b in bands]
        if len(bands) != need:
            raise ConfigError(f"--bands gives {len(bands)} band(s) but the model needs {need} ({wanted})",
                              f"give {need} raster band numbers in the model's order")
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise DataError(f"raster has {src.count} band(s) but the band mapping needs band(s) {bad}",
                            f"use band numbers 1..{src.count}, or a raster with the model's bands ({wanted})")
        return bands, "given"
    if src.count < need:
        raise DataError(f"raster has {src.count} band(s) but the model needs {need} ({wanted})",
                        "use a raster with these bands, or stack them into one (e.g. gdalbuildvrt -separate)")
    desc = [(d or "").strip().lower() for d in src.descriptions]
    if all(n.lower() in desc for n in band_names):
        return [desc.index(n.lower()) + 1 for n in band_names], "band descriptions"
    by_colour = _by_colour_interp(src, band_names)
    if by_colour is not None:
        return by_colour, "colour interpretation"
    if src.count == need:
        return list(range(1, need + 1)), "band order"
    raise ConfigError(f"cannot tell which of the raster's {src.count} bands are the model's {wanted}",
                      f"give them with --bands, e.g. --bands {','.join(str(i) for i in range(1, need + 1))}")


def _by_colour_interp(src, band_names: Sequence[str]) -> list[int] | None:
    interp = list(src.colorinterp)
    out = []
    for name in band_names:
        wave = wavelength_nm(name)
        if wave is None:
            return None
        colour = min(TRUE_COLOUR_NM, key=lambda c: abs(TRUE_COLOUR_NM[c] - wave))
        if abs(TRUE_COLOUR_NM[colour] - wave) > 40 or _COLOUR_INTERP[colour] not in interp:
            return None
        out.append(interp.index(_COLOUR_INTERP[colour]) + 1)
    return out if len(set(out)) == len(out) else None


@dataclasses.dataclass
class Batch:
    # (n, C, tile, tile) float32 or the raster's integer type; invalid pixels = model mean. The
    # reader reuses this memory: with `in_flight` batches in use by the consumer, it is valid
    # until the in_flight + 1-th batch after it is taken (1 in flight: the batch after next).
    images: np.ndarray
    rows: np.ndarray     # (n,) tile rows in the grid
    cols: np.ndarray
    valid: np.ndarray    # (n,) fraction of valid pixels
    skipped: int = 0     # tiles skipped (nodata / outside) since the previous batch


@dataclasses.dataclass
class ReaderStats:
    read_s: float = 0.0       # inside rasterio reads (I/O, decoding, warping)
    cut_s: float = 0.0        # cutting strips into tiles, validity
    put_wait_s: float = 0.0   # blocked because the consumer was busy (reader ahead: good)
    strips: int = 0
    skipped: int = 0


class _Source:
    """Reads (bands, valid) for a window of the grid from the raster, opened in the calling
    thread (rasterio datasets are not shared between threads)."""

    def __init__(self, path: str, grid: Grid, bands: list[int]):
        self.src = rasterio.open(path)
        self.grid = grid
        self.bands = bands
        self.vrt = None
        self._strips: dict[tuple[int, int], np.ndarray] = {}  # read buffers by shape, reused
        if grid.warp:
            wrapped = lon_wrapped_crs(self.src)  # a raster past 180 degrees east is read there
            self.vrt = WarpedVRT(self.src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                 height=grid.height, resampling=grid.resampling, add_alpha=True,
                                 **({"src_crs": wrapped} if wrapped is not None else {}))
            self.alpha = self.vrt.count
            self.mode = "alpha"
        else:
            flags = self.src.mask_flag_enums[bands[0] - 1]
            nodata = [self.src.nodatavals[b - 1] for b in bands]
            if MaskFlags.all_valid in flags and not any(v is not None for v in nodata):
                self.mode = "none"
            elif any(v is not None for v in nodata):
                self.mode = "nodata"
                self.nodata = nodata
            else:
                self.mode = "mask"  # alpha band or internal mask

    def close(self) -> None:
        if self.vrt is not None:
            self.vrt.close()
        self.src.close()

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(bands, height, width) values and where they are valid; None: every pixel is (a
        window inside a raster without nodata or mask, the usual case: nothing to compute)."""
        if self.vrt is not None:  # the warped view spans every tile: no clipping needed
            arr = self.vrt.read(self.bands + [self.alpha], window=Window(col, row, width, height))
            data, valid = arr[:-1], arr[-1] > 0
            return data, valid & _finite(data)
        src = self.src
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, src.height), min(col + width, src.width)
        inside = (r0, c0, r1, c1) == (row, col, row + height, col + width)
        if r1 <= r0 or c1 <= c0:
            return np.zeros((len(self.bands), height, width), src.dtypes[self.bands[0] - 1]), \
                np.zeros((height, width), bool)
        win = Window(c0, r0, c1 - c0, r1 - r0)
        part = src.read(self.bands, window=win, out=self._strip(r1 - r0, c1 - c0) if inside else None)
        ok: np.ndarray | bool = True
        if self.mode == "nodata":
            is_nd = [(np.isnan(b) if nd is not None and np.isnan(nd) else b == nd)
                     for b, nd in zip(part, self.nodata, strict=True) if nd is not None]
            ok = ~np.logical_and.reduce(is_nd)
        elif self.mode == "mask":
            ok = src.read_masks(self.bands[0], window=win) > 0
        ok = ok & _finite(part)
        if inside:  # no copy into a padded strip
            return part, (None if ok is True else np.asarray(ok))
        data = np.zeros((len(self.bands), height, width), dtype=part.dtype)
        valid = np.zeros((height, width), dtype=bool)
        ys, xs = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        data[:, ys, xs] = part
        valid[ys, xs] = ok
        return data, valid


    def _strip(self, height: int, width: int) -> np.ndarray:
        """A reused buffer for a strip read: a fresh 1.5 MB array per strip would be mapped
        and unmapped each time where malloc's trim threshold is set (Dask's workers set it),
        and every unmap interrupts the inference threads of the process."""
        key = (height, width)
        if key not in self._strips:
            if len(self._strips) >= 4:  # the usual strip, a row's last one, and rare others
                self._strips.clear()
            self._strips[key] = np.empty((len(self.bands), height, width), self.src.dtypes[self.bands[0] - 1])
        return self._strips[key]


def _finite(data: np.ndarray) -> np.ndarray | bool:
    if np.issubdtype(data.dtype, np.floating):
        return np.isfinite(data).all(axis=0)
    return True


class _Filling:
    """The batch being filled, in a ring of buffers reused in turn: the queue's batches, the
    ones being classified and the one the consumer took before them, and the one being filled."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, ring_size: int):
        self.shape, self.dtype, self.ring_size = shape, dtype, ring_size
        self.ring: list[np.ndarray] = [np.empty(shape, dtype)]
        self.turn = 0
        self.skipped = 0  # tiles skipped since the previous batch
        self._fresh()

    def _fresh(self) -> None:
        b = self.shape[0]
        self.images = self.ring[self.turn]
        self.rows, self.cols = np.empty(b, np.int64), np.empty(b, np.int64)
        self.valid = np.empty(b, np.float32)
        self.n = 0

    def add(self, row: int, cols: np.ndarray, valid: np.ndarray) -> None:
        """Record the tiles just cut into `images[n:n + len(cols)]`."""
        k = len(cols)
        self.rows[self.n:self.n + k], self.cols[self.n:self.n + k], self.valid[self.n:self.n + k] = row, cols, valid
        self.n += k

    def take(self) -> Batch:
        batch = Batch(self.images[:self.n], self.rows[:self.n], self.cols[:self.n], self.valid[:self.n], self.skipped)
        self.skipped = 0
        return batch

    def take_skipped(self) -> Batch:
        """No tiles, only the count skipped (the batch being filled stays)."""
        batch = Batch(self.images[:0], self.rows[:0], self.cols[:0], self.valid[:0], self.skipped)
        self.skipped = 0
        return batch

    def next(self) -> None:
        """Move on to the next buffer of the ring (allocated on first use)."""
        self.turn = (self.turn + 1) % self.ring_size
        if self.turn == len(self.ring):
            self.ring.append(np.empty(self.shape, self.dtype))
        self._fresh()


class PrefetchReader:
    """Iterate over `Batch`es of the planned tiles, read ahead in a background thread."""

    def __init__(self, path: str | Path, plan: TilePlan, bands: list[int], fill: Sequence[float],
                 batch_size: int = 64, min_valid: float = 0.5, prefetch: int = 4,
                 max_strip_tiles: int = 256, nice: int = 0, dtype: str | np.dtype = "float32",
                 in_flight: int = 1, scale: float = 1.0):
        self.path = str(path)
        self.scale = float(scale)  # pixels are multiplied by it (float batches only)
        if self.scale != 1 and np.dtype(dtype).kind != "f":
            raise ValueError("scaled pixels need a floating-point batch dtype")
        self.nice = nice
        self.dtype = np.dtype(dtype)
        self.plan = plan
        self.grid = plan.grid
        self.bands = bands
        fill_values = np.asarray(fill, np.float64).reshape(-1, 1, 1)
        if self.dtype.kind in "iu":  # the nearest value the batch dtype holds
            info = np.iinfo(self.dtype)
            fill_values = np.clip(np.rint(fill_values), info.min, info.max)
        self.fill = fill_values.astype(self.dtype)
        self.batch_size = int(batch_size)
        self.min_valid = float(min_valid)
        self.max_strip_tiles = max(1, int(max_strip_tiles))
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.in_flight = max(1, int(in_flight))  # batches the consumer holds at once
        self.stop = threading.Event()
        self.stats = ReaderStats()
        self._thread: threading.Thread | None = None

    # -- consumer side ---------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        self._thread = threading.Thread(target=self._run, name="asymkd-tile-reader", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (also on cancel) and wait for it, so the raster is closed."""
        self.stop.set()
        while self._thread is not None and self._thread.is_alive():
            try:
                self.queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)

    # -- reader thread ---------------------------------------------------------------
    def _put(self, item) -> bool:
        start = time.perf_counter()
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                self.stats.put_wait_s += time.perf_counter() - start
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        source = None
        if self.nice:
            lower_thread_priority(self.nice)
        try:
            with rasterio.Env(GDAL_CACHEMAX=_cache_mb(self.path)):
                source = _Source(self.path, self.grid, self.bands)
                try:
                    self._produce(source)
                finally:
                    source.close()
            self._put(None)
        except BaseException as exc:  # hand every failure to the consumer thread
            self._put(exc)

    def _produce(self, source: _Source) -> None:
        T, S, B = self.grid.tile, self.grid.stride, self.batch_size
        fill = _Filling((B, len(self.bands), T, T), self.dtype, self.queue.maxsize + self.in_flight + 2)
        for r, row_cols in self.plan:
            for chunk in _chunks(row_cols, self.max_strip_tiles):
                if self.stop.is_set():
                    return
                windows, ok, step, frac, keep = self._read_strip(source, r, chunk)
                t1 = time.perf_counter()
                fill.skipped += len(chunk) - len(keep)
                done = 0
                while done < len(keep):
                    k = min(B - fill.n, len(keep) - done)
                    take = keep[done:done + k]
                    self._cut(fill.images[fill.n:fill.n + k], windows, step[take], frac[take], ok, S)
                    fill.add(r, chunk[take], frac[take])
                    done += k
                    if fill.n == B:
                        self.stats.cut_s += time.perf_counter() - t1
                        if not self._send(fill.take()):
                            return
                        fill.next()
                        t1 = time.perf_counter()
                self.stats.cut_s += time.perf_counter() - t1
                if fill.skipped >= 4 * B and not self._send(fill.take_skipped()):
                    return  # (an empty batch keeps progress moving through empty areas)
        if fill.n or fill.skipped:
            self._send(fill.take())

    def _send(self, batch: Batch) -> bool:
        if not self._put(batch):
            return False
        self.stats.skipped += batch.skipped
        return True

    def _read_strip(self, source: _Source, r: int, chunk: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
        """Row `r`'s strip under the tiles of `chunk`: every tile window as a view (tiles, bands,
        T, T; no copy until the batch), the valid-pixel mask, each tile's step in the strip, its
        valid fraction and the tiles worth classifying."""
        T, S = self.grid.tile, self.grid.stride
        t0 = time.perf_counter()
        c0 = int(chunk[0])
        data, ok = source.read(r * S, c0 * S, T, (int(chunk[-1]) - c0) * S + T)
        self.stats.read_s += time.perf_counter() - t0
        self.stats.strips += 1
        step = chunk - c0  # the tiles' windows in the strip, in steps of S
        if ok is None:
            frac = np.ones(len(chunk))
        else:
            csum = np.concatenate([[0], np.cumsum(ok.sum(axis=0, dtype=np.int64))])
            frac = (csum[step * S + T] - csum[step * S]) / float(T * T)
        keep = np.flatnonzero((frac >= self.min_valid) & (frac > 0.0))
        windows = np.lib.stride_tricks.sliding_window_view(data, T, axis=2)[:, :, ::S].transpose(2, 0, 1, 3)
        return windows, ok, step, frac, keep

    def _cut(self, out: np.ndarray, windows: np.ndarray, steps: np.ndarray, frac: np.ndarray,
             ok: np.ndarray | None, stride: int) -> None:
        """Copy the tile windows `steps` of a strip into `out` (cast to the batch dtype), with
        no temporary array (np.take and fancy indexing would copy the strip first); a tile's
        invalid pixels get the fill value."""
        first = int(steps[0])
        if int(steps[-1]) - first + 1 == len(steps):  # consecutive windows: one strided copy
            np.copyto(out, windows[first:first + len(steps)], casting="unsafe")
        else:
            for j, step in enumerate(steps.tolist()):
                np.copyto(out[j], windows[step], casting="unsafe")
        if self.scale != 1:
            out *= self.scale
        tile = out.shape[-1]
        for j in np.flatnonzero(frac < 1.0).tolist():
            assert ok is not None  # a tile with invalid pixels comes from a strip with a mask
            off = int(steps[j]) * stride
            np.copyto(out[j], np.where(ok[None, :, off:off + tile], out[j], self.fill))


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread). A reader or
    writer thread that preempts an onnxruntime worker stalls the whole parallel operator,
    which then waits for the preempted thread; at a low priority these threads run in the
    gaps instead, and still run whenever inference waits for them."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


def _cache_mb(path: str) -> int:
    """GDAL block cache (MB) for streaming: two rows of the raster's blocks, so each block is
    decoded once while strips of tiles pass through it, and no more. GDAL's default (5% of
    RAM) would keep the whole raster cached and memory would grow with its size."""
    try:
        with rasterio.open(path) as src:
            block_h = src.block_shapes[0][0]
            row_bytes = src.width * min(block_h, src.height) * src.count * np.dtype(src.dtypes[0]).itemsize
    except Exception:  # the reader itself reports unreadable rasters
        return 64
    return int(min(max(2 * row_bytes / 2**20, 64), 512))


def _chunks(cols: np.ndarray, max_tiles: int) -> Iterator[np.ndarray]:
    """Split sorted columns into runs spanning at most `max_tiles` columns each."""
    start = 0
    while start < len(cols):
        end = int(np.searchsorted(cols, cols[start] + max_tiles, side="left"))
        yield cols[start:end]
        start = end
