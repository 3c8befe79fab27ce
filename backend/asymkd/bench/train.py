"""`asymkd bench train`: training-speed numbers.

Measured here:
- re-pairing: `repair_by_kl` for N_rgb x N_ms x K classes on random logits with labels
  (default 100,000 x 10,000 x 10; target at most 2 s on a 2-core CPU).
- the distillation-epoch / plain-epoch time ratio (target at most 1.3) belongs in
  `epoch_ratio`; `run` prints it when that function returns a result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import layout
from ..errors import ConfigError
from ..events import Events
from ..layout import RunFolder
from ..train.pairing import pairing_stats, repair_by_kl

REPAIR_TARGET_S = 2.0
EPOCH_RATIO_TARGET = 1.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("re-pairing timing")
    g.add_argument("--rgb", type=int, default=100_000, help="RGB samples (default 100000)")
    g.add_argument("--ms", type=int, default=10_000, help="MS samples (default 10000)")
    g.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    g.add_argument("--unlabeled", type=float, default=0.0,
                   help="fraction of RGB samples without a label (paired against all MS; default 0)")
    g.add_argument("--repeats", type=int, default=5, help="timed repetitions after the first call (default 5)")
    g.add_argument("--chunk", type=int, default=None, help="RGB rows per GEMM (default: automatic)")
    g.add_argument("--workers", type=int, default=None,
                   help="CPU threads for the re-pairing (default: torch's thread count)")
    g.add_argument("--device", default="cpu", help="torch device for the re-pairing (default cpu)")
    g.add_argument("--seed", type=int, default=0)
    e = parser.add_argument_group("epoch time ratio")
    e.add_argument("--epoch-samples", type=int, default=2048, help="RGB patches per epoch (0 skips; default 2048)")
    e.add_argument("--epoch-size", type=int, default=64, help="patch size in pixels (default 64)")
    e.add_argument("--epoch-count", type=int, default=3, help="epochs timed per student (default 3)")
    from ..config import DistillConfig, TeacherConfig
    student, teacher = DistillConfig(), TeacherConfig()
    e.add_argument("--student", default=student.backbone, help=f"student backbone (default {student.backbone})")
    e.add_argument("--input-size", type=int, default=student.input_size,
                   help=f"the student's input size (default {student.input_size})")
    e.add_argument("--teacher", default=teacher.backbone, help=f"teacher backbone (default {teacher.backbone})")
    e.add_argument("--teacher-input-size", type=int, default=teacher.input_size,
                   help=f"the teacher's input size (default {teacher.input_size}): its feature map's size")
    e.add_argument("--epoch-device", default="auto", help="device for the epoch timing (default auto)")


@dataclass
class RepairTiming:
    n_rgb: int
    n_ms: int
    classes: int
    unlabeled: float
    threads: int
    device: str
    first_s: float
    median_s: float
    best_s: float
    target_s: float
    ratio: float            # median / target: <= 1 meets the target
    distinct_ms: int
    max_count: int


def _check(args: argparse.Namespace) -> None:
    if args.rgb < 1 or args.ms < 1 or args.classes < 1:
        raise ConfigError("--rgb, --ms and --classes must be positive", "e.g. --rgb 100000 --ms 10000 --classes 10")
    if args.ms < args.classes:
        raise ConfigError(f"--ms {args.ms} is smaller than --classes {args.classes}", "every class needs an MS sample")
    if not 0.0 <= args.unlabeled <= 1.0:
        raise ConfigError(f"--unlabeled must be a fraction in [0, 1], got {args.unlabeled}")
    if args.repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repair_timing(args: argparse.Namespace, events: Events) -> RepairTiming:
    """Time `repair_by_kl` on random student log-probs and teacher probs."""
    _check(args)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    k = args.classes
    student_logp = torch.log_softmax(2.0 * torch.randn(args.rgb, k, generator=gen), dim=1).to(device)
    teacher_p = torch.softmax(3.0 * torch.randn(args.ms, k, generator=gen), dim=1).to(device)
    # Every class has MS samples; labels otherwise uniform at random.
    ms_labels = np.r_[np.arange(k), rng.integers(0, k, args.ms - k)]
    rgb_labels = rng.integers(0, k, args.rgb)
    rgb_labels[rng.random(args.rgb) < args.unlabeled] = -1

    times = []
    assign = np.zeros(0, np.int64)
    for _ in events.track(range(args.repeats + 1), total=args.repeats + 1, step="bench-repair", unit="run"):
        _sync(device)
        start = time.perf_counter()
        assign = np.asarray(repair_by_kl(student_logp, teacher_p, rgb_labels, ms_labels, chunk=args.chunk,
                                         workers=args.workers))
        _sync(device)
        times.append(time.perf_counter() - start)
    labeled = rgb_labels >= 0
    if not (ms_labels[assign[labeled]] == rgb_labels[labeled]).all():
        raise RuntimeError("re-pairing gave a labeled RGB sample an MS partner of another class")
    stats = pairing_stats(assign, ms_labels)
    median = statistics.median(times[1:])
    return RepairTiming(n_rgb=args.rgb, n_ms=args.ms, classes=k, unlabeled=args.unlabeled,
                        threads=args.workers or torch.get_num_threads(), device=str(device), first_s=times[0],
                        median_s=median, best_s=min(times[1:]), target_s=REPAIR_TARGET_S,
                        ratio=median / REPAIR_TARGET_S, distinct_ms=int(stats["distinct_ms"]),
                        max_count=int(stats["max_count"]))


def epoch_ratio(args: argparse.Namespace, events: Events) -> dict[str, float] | None:
    """Time of one distillation epoch / one plain student epoch on the same data.

    Both students train on the same random labeled RGB patches with the same backbone and
    batch size; the distilled one also reads its partners' cached teacher features, runs
    the cross-modal attention, the domain and pseudo-label terms, and re-pairs every epoch.
    The one-off teacher cache is not part of an epoch. Median over epochs after the first.
    """
    if args.epoch_samples <= 0:
        return None
    import json
    import tempfile
    from pathlib import Path

    from ..config import from_dict
    from ..data.patches import PatchSet
    from ..models.backbones import SceneClassifier
    from ..models.files import save_model
    from ..models.metadata import ModelMeta
    from ..pipeline import train_context
    from ..train.distill import StudentInputs, train_student

    rng = np.random.default_rng(args.seed)
    k, n, size = 10, args.epoch_samples, args.epoch_size
    labels = np.arange(n) % k
    rgb = PatchSet(images=rng.uniform(0, 255, (n, 3, size, size)).astype(np.float32), labels=labels,
                   class_names=[f"c{i}" for i in range(k)], band_names=["R", "G", "B"],
                   stems=[f"r{i}" for i in range(n)], paths=[""] * n)
    n_ms = 270
    ms = PatchSet(images=rng.uniform(0, 3000, (n_ms, 13, size, size)).astype(np.float32),
                  labels=np.arange(n_ms) % k, class_names=rgb.class_names,
                  band_names=[f"b{i}" for i in range(13)], stems=[f"m{i}" for i in range(n_ms)],
                  paths=[""] * n_ms, modality="ms")
    # no MS rows: both students train on the same rows, so the ratio is distillation's cost per row
    cfg = from_dict({"distill": {"epochs": args.epoch_count, "baseline": True, "backbone": args.student,
                                 "input_size": args.input_size, "ms_rows": False},
                     "data": {"val_fraction": 0.05}, "device": args.epoch_device, "seed": args.seed})
    with tempfile.TemporaryDirectory() as tmp:
        teacher = RunFolder(Path(tmp)).teacher
        save_model(teacher, SceneClassifier(args.teacher, 13, k, input_size=args.teacher_input_size),
                   ModelMeta(backbone=args.teacher, class_names=ms.class_names, band_names=ms.band_names,
                             mean=[0.0] * 13, std=[1000.0] * 13, patch_size=size))
        soft = rng.dirichlet(np.ones(k), n_ms).astype(np.float32)
        np.save(teacher / layout.SOFT_LABELS, soft)
        (teacher / layout.MS_INDEX).write_text(json.dumps({"stems": ms.stems, "labels": ms.labels.tolist()}))
        pairs = np.array([rng.choice(np.flatnonzero(ms.labels == c)) for c in labels])
        seconds = {}
        ctx = train_context(cfg, events)
        for name, baseline in (("plain", True), ("distill", False)):
            m = train_student(cfg.distill, StudentInputs(rgb, ms, teacher, pairs), Path(tmp) / name, ctx,
                              baseline=baseline, pairing=cfg.pairing, val_fraction=cfg.data.val_fraction)
            times = [h["epoch_seconds"] for h in m.metrics["history"]]
            seconds[name] = statistics.median(times[1:] if len(times) > 1 else times)
    ratio = seconds["distill"] / seconds["plain"]
    return {"ratio": ratio, "target": EPOCH_RATIO_TARGET, "plain_epoch_s": seconds["plain"],
            "distill_epoch_s": seconds["distill"], "samples": n, "patch": size,
            "student": args.student, "teacher": args.teacher, "input_size": args.input_size,
            "plain_images_per_s": n / seconds["plain"]}


def _say(args: argparse.Namespace, text: str) -> None:
    # With `--events -` stdout carries only JSON lines.
    print(text, file=sys.stderr if args.events == "-" else sys.stdout, flush=True)


def run(args: argparse.Namespace, events: Events) -> int:
    with events.step("bench-train"):
        r = repair_timing(args, events)
        events.metrics("bench-train", {"repair": asdict(r)})
        verdict = "meets" if r.ratio <= 1.0 else "misses"
        _say(args, f"re-pairing {r.n_rgb:,} RGB x {r.n_ms:,} MS x {r.classes} classes"
                   f" ({r.unlabeled:.0%} unlabeled, {r.device}, {r.threads} threads): "
                   f"median {r.median_s:.3f} s, best {r.best_s:.3f} s, first call {r.first_s:.3f} s")
        _say(args, f"  target {r.target_s:.1f} s: ratio {r.ratio:.3f} ({verdict} the target); "
                   f"{r.distinct_ms:,} distinct MS partners, most-used MS taken {r.max_count} times")
        ratio = epoch_ratio(args, events)
        if ratio is not None:
            events.metrics("bench-train", {"epoch": ratio})
            verdict = "meets" if ratio["ratio"] <= ratio["target"] else "misses"
            _say(args, f"distillation epoch {ratio['distill_epoch_s']:.2f} s / "
                       f"plain epoch {ratio['plain_epoch_s']:.2f} s "
                       f"({ratio['samples']} patches of {ratio['patch']} px, {ratio['student']} student at "
                       f"{ratio['input_size'] or ratio['patch']} px): "
                       f"ratio {ratio['ratio']:.2f} (target {ratio['target']:.1f}, {verdict} it)")
    return 0
