"""`asymkd bench classify`: is tile classification limited by compute, and is its memory bounded?

Prints (a) pure onnxruntime throughput on in-memory batches (the compute limit: the best of
classify's own configuration, batches classified at once included, and of one batch at a
time with and without spinning threads; the tiles are fed as classify feeds them),
(b) end-to-end `classify` throughput on a synthetic GeoTIFF of --size x --size pixels,
(c) their ratio: each run over the compute rate measured around it, median of --repeat runs
(target >= 0.95), and (d) the peak RSS of `classify` on a raster of a
quarter of the pixels and on the full one, and their ratio (target <= 1.2), with where the
time went. Each classify runs in its own process so its peak RSS is its own. The rasters
go to a temporary folder that is removed afterwards (unless --keep).

With --workers 1,2 it measures classification on local Dask clusters instead: tiles/s of
plain `classify` and of `classify --workers N` for each N on the same raster (each in its
own process, the cluster's start included), and the overhead of one worker against plain
classify (seconds, 1 worker / plain in the same round, median of --repeat rounds; target <= 1.1).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..classify import ClassifyOptions
from ..classify.infer import available_cores
from ..layout import RunFolder

TARGET_RATIO = 0.95
TARGET_RSS_RATIO = 1.2
TARGET_WORKER_OVERHEAD = 1.1
PURE_BATCHES = 8  # distinct in-memory batches per stream in the pure measurement


def add_arguments(parser) -> None:
    parser.add_argument("--model", metavar="FILE.onnx", default=None,
                        help="exported model (default: a random-weight student exported to the temp folder)")
    from ..config import DistillConfig
    student = DistillConfig()
    parser.add_argument("--backbone", default=student.backbone,
                        help=f"student backbone when no --model (default: the default student, {student.backbone})")
    parser.add_argument("--input-size", type=int, default=student.input_size,
                        help=f"the student's input size when no --model (default {student.input_size})")
    parser.add_argument("--classes", type=int, default=10, help="classes of the generated student (default 10)")
    parser.add_argument("--size", type=int, default=8192, help="side of the large raster in pixels (default 8192)")
    parser.add_argument("--tile", type=int, default=64, help="tile size in pixels (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="inference threads in all (default 0: every core)")
    parser.add_argument("--streams", type=int, default=ClassifyOptions.streams,
                        help="batches classified at once (default 0: classify's default)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of the pure onnxruntime measurement")
    parser.add_argument("--repeat", type=int, default=3,
                        help="end-to-end runs on the large raster (default 3; the median ratio is the result)")
    parser.add_argument("--compress", choices=("none", "deflate"), default="none",
                        help="compression of the synthetic rasters")
    parser.add_argument("--workdir", default=None, help="folder for the synthetic rasters (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="onnxruntime provider for both measurements (default cpu)")
    parser.add_argument("--workers", default=None, metavar="1,2",
                        help="measure classify on local Dask clusters of these worker counts against plain "
                             "classify, instead of (a)-(d)")


def run(args, events) -> int:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="asymkd-bench-classify-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _bench_workers(args, events, work) if args.workers else _bench(args, events, work)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


class _PureRates:
    """Pure onnxruntime rates of classify's configuration and of one batch at a time with and
    without spinning threads: the compute limit that end-to-end runs are compared with."""

    def __init__(self, model: Path, args):
        self.model, self.args = model, args
        self.configs = [(args.streams, ClassifyOptions.spinning), (1, True), (1, False)]
        self.best_by_config: dict[str, float] = {}
        self.cpu_by_config: dict[str, float] = {}

    def measure(self) -> float:
        """The compute limit now: the best configuration's pure rate."""
        a, best = self.args, 0.0
        for streams, spinning in self.configs:
            rate, cpu, name = _pure_ort(self.model, a.batch_size, a.tile, a.threads, a.seconds, spinning,
                                        a.device, streams)
            best = max(best, rate)
            self.best_by_config[name] = max(self.best_by_config.get(name, 0.0), rate)
            self.cpu_by_config[name] = min(self.cpu_by_config.get(name, float("inf")), cpu)
            print(f"(a) pure onnxruntime ({name}): {rate:.0f} tiles/s, {cpu * 1000:.2f} CPU ms/tile", flush=True)
        return best


def _bench(args, events, work: Path) -> int:
    model = Path(args.model) if args.model else _make_model(work, args.backbone, args.classes, args.tile, events,
                                                                   args.input_size)
    small, large = args.size // 2, args.size
    rasters = {}
    for side in (small, large):
        rasters[side] = work / f"synthetic_{side}.tif"
        with events.step("bench-raster", size=side):
            _write_raster(rasters[side], side, args.compress)
    print(f"model {model} | batch {args.batch_size} | tile {args.tile} px | threads {args.threads or 'every core'} "
          f"| {available_cores()} cores", flush=True)
    pure = _PureRates(model, args)
    # The machine's speed drifts (up to 30 % between minutes on a shared 2-core machine):
    # each end-to-end run is compared with the compute rate measured just before and just
    # after it, and the runs' median is the result.
    runs = []
    computes = [pure.measure()]
    for _ in range(max(1, args.repeat)):
        r = _child_classify(model, rasters[large], work / f"out_{large}.gpkg", args, ClassifyOptions.spinning)
        runs.append(r)
        print(f"(b) end-to-end classify {large}x{large}: {r['tiles_per_s']:.0f} tiles/s "
              f"({r['tiles']} tiles in {r['seconds']:.2f} s; in-loop {r['loop_tiles_per_s']:.0f} tiles/s), "
              f"{r['cpu_ms_per_tile']:.2f} CPU ms/tile, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        computes.append(pure.measure())
    best = max(runs, key=lambda r: r["tiles_per_s"])
    small_run = _child_classify(model, rasters[small], work / f"out_{small}.gpkg", args, best["spinning"])
    events.metrics("bench-classify", {**_summarise(runs, computes, pure, small_run, small, large),
                                      "raster": large, "batch_size": args.batch_size, "threads": args.threads,
                                      "provider": best["provider"]})
    return 0


def _summarise(runs: list[dict], computes: list[float], pure: _PureRates, small_run: dict,
               small: int, large: int) -> dict:
    """Print the ratios (c), memory (d) and where the time went; the numbers as metrics."""
    rounds = [r["tiles_per_s"] / ((computes[i] + computes[i + 1]) / 2) for i, r in enumerate(runs)]
    ratio = float(np.median(rounds))
    compute = max(pure.best_by_config.values())
    best = max(runs, key=lambda r: r["tiles_per_s"])
    best_ratio = best["tiles_per_s"] / compute
    large_rss = max(r["peak_rss_mb"] for r in runs)
    rss_ratio = large_rss / small_run["peak_rss_mb"]
    print(f"(c) end-to-end / compute: {ratio:.3f}, the median of the runs' "
          f"{' / '.join(f'{v:.3f}' for v in rounds)} (each over the mean compute rate just before and after it; "
          f"target >= {TARGET_RATIO}) {'OK' if ratio >= TARGET_RATIO else 'MISSED'}; best over best {best_ratio:.3f}")
    cpu_ratio = min(pure.cpu_by_config.values()) * 1000 / min(r["cpu_ms_per_tile"] for r in runs)
    print(f"    CPU time per tile, compute / end-to-end: {cpu_ratio:.3f} (insensitive to other load on the machine)")
    print(f"(d) peak RSS {small}x{small}: {small_run['peak_rss_mb']:.0f} MB, {large}x{large}: "
          f"{large_rss:.0f} MB, ratio {rss_ratio:.3f} for 4x the pixels "
          f"(target <= {TARGET_RSS_RATIO}) {'OK' if rss_ratio <= TARGET_RSS_RATIO else 'MISSED'}")
    print("where the time went (best large run, seconds):")
    for k, v in best["timings"].items():
        print(f"    {k:20s} {v:8.3f}")
    print(f"    {'process wall':20s} {best['process_s']:8.3f}  (includes imports and model load)")
    return {"pure_tiles_per_s": compute, "pure_by_config": pure.best_by_config,
            "e2e_tiles_per_s": best["tiles_per_s"], "e2e_spinning": best["spinning"], "ratio": ratio,
            "round_ratios": rounds, "best_over_best": best_ratio, "compute_rates": computes,
            "cpu_ratio": cpu_ratio, "rss_ratio": rss_ratio, "timings": best["timings"],
            "peak_rss_mb": {str(small): small_run["peak_rss_mb"], str(large): large_rss}}


def _make_model(work: Path, backbone: str, classes: int, tile: int, events, input_size: int = 0) -> Path:
    import torch

    from ..export import export_onnx
    from ..models.backbones import SceneClassifier
    from ..models.files import save_model
    from ..models.metadata import ModelMeta
    torch.manual_seed(0)
    net = SceneClassifier(backbone, 3, classes, input_size=input_size)
    meta = ModelMeta(backbone=backbone, class_names=[f"class{i}" for i in range(classes)], band_names=["R", "G", "B"],
                     mean=[110.0, 115.0, 100.0], std=[50.0, 45.0, 45.0], patch_size=tile, gsd=10.0)
    run = RunFolder(work)
    save_model(run.student, net, meta)
    return export_onnx(run.student, run.student_onnx, check_samples=16, overwrite=True, events=events).path


def _write_raster(path: Path, side: int, compress: str) -> None:
    """A 3-band uint8 tiled GeoTIFF with some structure (blocks + noise), written in strips."""
    import rasterio
    from rasterio.transform import from_origin
    if path.exists():
        return
    rng = np.random.default_rng(side)
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32632",
                   transform=from_origin(500000, 5200000 + side * 10, 10, 10), tiled=True, blockxsize=256,
                   blockysize=256, photometric="RGB", nodata=None)
    if compress != "none":
        profile["compress"] = compress
    tmp = path.with_suffix(".partial.tif")
    base = rng.integers(40, 200, size=(3, side // 64 + 1, side // 64 + 1), dtype=np.uint8)
    with rasterio.open(tmp, "w", **profile) as dst:
        strip = 1024
        for r0 in range(0, side, strip):
            h = min(strip, side - r0)
            coarse = np.repeat(np.repeat(base[:, r0 // 64:(r0 + h) // 64 + 1], 64, axis=1), 64, axis=2)[:, :h, :side]
            noise = rng.integers(0, 40, size=(3, h, side), dtype=np.uint8)
            dst.write(coarse + noise, window=((r0, r0 + h), (0, side)))
    os.replace(tmp, path)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _children_cpu_s() -> float:
    """CPU seconds of the finished child processes and of the processes they waited for:
    a whole cluster's work, and unlike wall time hardly changed by other load."""
    t = os.times()
    return t.children_user + t.children_system


def _pure_ort(model: Path, batch: int, tile: int, threads: int, seconds: float, spinning: bool,
              device: str = "cpu", streams: int = 0) -> tuple[float, float, str]:
    """(tiles/s, CPU seconds per tile, configuration) of onnxruntime alone: classify's own
    session (8-bit tiles cast in the graph, as for the bench's rasters), `streams` in-memory
    batches classified at once. Each stream cycles through batches of its own, as classify
    never feeds a batch that is still in the CPU's caches."""
    from ..classify.infer import OnnxClassifier
    clf = OnnxClassifier(model, device=device, threads=threads, spinning=spinning, input_dtype="uint8",
                         streams=streams)
    rng = np.random.default_rng(0)
    xs = [[rng.integers(0, 256, size=(batch, 3, tile, tile), dtype=np.uint8) for _ in range(PURE_BATCHES)]
          for _ in range(clf.streams)]
    for own in xs:
        clf.predict(own[0])
    counts = [0] * clf.streams
    start, cpu = time.perf_counter(), _cpu_s()

    def run(i: int) -> None:
        k = 0
        while time.perf_counter() - start < seconds:
            clf.predict(xs[i][k % PURE_BATCHES])
            counts[i] += batch
            k += 1

    threads_ = [threading.Thread(target=run, args=(i,)) for i in range(clf.streams)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    n = sum(counts)
    name = f"{clf.streams} batch{'es' if clf.streams > 1 else ''} at once" + (
        f", {'spinning threads' if spinning else 'no spinning'}" if clf.streams == 1 else "")
    return n / (time.perf_counter() - start), (_cpu_s() - cpu) / n, name


def _child_classify(model: Path, raster: Path, out: Path, args, spinning: bool, workers: int = 0) -> dict:
    """Run classify in a fresh process (on a local cluster of `workers` workers when > 0);
    it reports its own time and peak RSS."""
    cmd = [sys.executable, "-c", "from asymkd.bench.classify import _child; _child()", str(model), str(raster),
           str(out), str(args.batch_size), str(args.threads), str(int(spinning)), args.device, str(workers),
           str(args.streams)]
    start, cpu = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    tree_cpu = _children_cpu_s() - cpu  # the child and every process it started (a cluster's workers)
    if proc.returncode != 0:
        raise RuntimeError(f"classify child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    result["tree_cpu_ms_per_tile"] = tree_cpu * 1000 / max(result["tiles"], 1)
    return result


def _peak_rss_kb() -> float:
    """This process's own peak RSS. ru_maxrss is not used: Linux carries the parent's peak
    over fork+exec, so a child of a big process would report the parent's memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child() -> None:
    model, raster, out, batch, threads, spinning, device, workers, streams = sys.argv[1:10]
    import onnxruntime  # noqa: F401 - imports are process start-up, not classification

    from ..classify import classify
    from ..classify import run as _run  # noqa: F401
    start, cpu = time.perf_counter(), _cpu_s()
    res = classify(model, raster, out, batch_size=int(batch), threads=int(threads), spinning=bool(int(spinning)),
                   overwrite=True, device=device, workers=int(workers) or None, streams=int(streams))
    seconds = time.perf_counter() - start
    cpu_per_tile = (_cpu_s() - cpu) / max(res.tiles_classified, 1)
    peak_kb = _peak_rss_kb()
    print(json.dumps({"tiles": res.tiles_classified, "seconds": seconds,
                      "tiles_per_s": res.tiles_classified / seconds,
                      "loop_tiles_per_s": res.tiles_classified / max(res.timings["loop_s"], 1e-9),
                      "peak_rss_mb": peak_kb / 1024.0, "cpu_ms_per_tile": cpu_per_tile * 1000, "timings": res.timings,
                      "provider": res.provider,
                      "spinning": bool(int(spinning))}))


def _worker_counts(text: str) -> list[int]:
    from ..errors import ConfigError
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--workers '{text}' is not a list of worker counts", "write e.g. --workers 1,2") from exc
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers '{text}' needs worker counts of at least 1", "write e.g. --workers 1,2")
    return counts


def _bench_workers(args, events, work: Path) -> int:
    """Plain classify against local Dask clusters of each worker count, interleaved in rounds:
    the machine's speed drifts between minutes, so each round's worker run is divided by that
    round's plain run and the overhead is the median over --repeat rounds."""
    counts = _worker_counts(args.workers)
    model = Path(args.model) if args.model else _make_model(work, args.backbone, args.classes, args.tile, events,
                                                                   args.input_size)
    raster = work / f"synthetic_{args.size}.tif"
    with events.step("bench-raster", size=args.size):
        _write_raster(raster, args.size, args.compress)
    print(f"model {model} | batch {args.batch_size} | tile {args.tile} px | raster {args.size}x{args.size} | "
          f"{available_cores()} cores", flush=True)
    runs: dict[int, list[dict]] = {n: [] for n in [0, *counts]}
    for _ in range(max(1, args.repeat)):  # interleaved, so a busy spell of the machine hits every setting
        for n in [0, *counts]:
            r = _child_classify(model, raster, work / f"out_w{n}.gpkg", args, False, workers=n)
            wait_s, start_s = (r["timings"].get(k, 0.0) for k in ("cluster_wait_s", "cluster_start_s"))
            r["after_start_tiles_per_s"] = r["tiles"] / max(r["seconds"] - wait_s, 1e-9)
            runs[n].append(r)
            what = "plain classify" if n == 0 else f"{n} worker(s)"
            print(f"{what:15s}: {r['tiles_per_s']:7.0f} tiles/s ({r['tiles']} tiles in {r['seconds']:.2f} s, "
                  f"{r['tree_cpu_ms_per_tile']:.2f} CPU ms/tile in all processes"
                  + (f"; cluster start {start_s:.2f} s of which the job waited {wait_s:.2f} s, "
                     f"{r['after_start_tiles_per_s']:.0f} tiles/s after the wait, "
                     f"{r['seconds'] / runs[0][-1]['seconds']:.3f} x this round's plain time)" if n else ")"),
                  flush=True)
    plain = runs[0]
    summary: dict = {"plain_tiles_per_s": statistics.median(r["tiles_per_s"] for r in plain), "raster": args.size,
                     "workers": {}}
    print(f"median over {len(plain)} round(s) (each worker run / the plain run of its round):")
    for n in counts:
        ratios = [r["seconds"] / p["seconds"] for r, p in zip(runs[n], plain, strict=True)]
        steady = [r["after_start_tiles_per_s"] / p["tiles_per_s"] for r, p in zip(runs[n], plain, strict=True)]
        cpu = [r["tree_cpu_ms_per_tile"] / p["tree_cpu_ms_per_tile"] for r, p in zip(runs[n], plain, strict=True)]
        start = statistics.median(r["timings"].get("cluster_start_s", 0.0) for r in runs[n])
        wait = statistics.median(r["timings"].get("cluster_wait_s", 0.0) for r in runs[n])
        summary["workers"][str(n)] = {"tiles_per_s": statistics.median(r["tiles_per_s"] for r in runs[n]),
                                      "overhead": statistics.median(ratios), "overheads": ratios,
                                      "after_start_vs_plain": statistics.median(steady),
                                      "cpu_overhead": statistics.median(cpu), "cluster_start_s": start,
                                      "cluster_wait_s": wait}
        w = summary["workers"][str(n)]
        print(f"    {n} worker(s): {w['tiles_per_s']:.0f} tiles/s; time / plain {w['overhead']:.3f} (per round "
              + " / ".join(f"{v:.3f}" for v in ratios) + f"); cluster start {start:.2f} s, waited {wait:.2f} s; "
              f"tiles/s after the wait / plain {w['after_start_vs_plain']:.3f}; CPU time per tile / plain "
              f"{w['cpu_overhead']:.3f}")
    if 1 in counts:
        overhead = summary["workers"]["1"]["overhead"]
        print(f"overhead of 1 worker vs plain classify: {overhead:.3f} in time (target <= {TARGET_WORKER_OVERHEAD}) "
              f"{'OK' if overhead <= TARGET_WORKER_OVERHEAD else 'MISSED'}")
    events.metrics("bench-classify-workers", summary)
    return 0
