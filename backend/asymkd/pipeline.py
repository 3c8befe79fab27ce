"""The job steps as the CLI, the QGIS plugin, Processing and the demo run them.

Each step reads the run's resolved config (RUN/config.yaml), writes its own folder, and can
be resumed: a finished step (its metrics.json exists) is skipped by `run --resume`, a step
killed mid-way continues from its last epoch checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config as config_mod
from . import layout
from .config import RunConfig
from .data.patches import MS_SET, PatchSet, load_folder, require_classes
from .errors import DataError
from .events import NULL_EVENTS, Events
from .fileio import atomic_save_npz, read_npz
from .layout import RunFolder
from .train import distributed, seeds
from .train.common import TrainContext, resolve_device

if TYPE_CHECKING:
    from .train.distill import StudentInputs

CONFIG_FILE = layout.CONFIG


# -- configuration -------------------------------------------------------------------
def resolve_config(run_dir: Path, config_file: str | None = None,
                   overrides: dict[str, Any] | None = None, write: bool = True) -> RunConfig:
    """Defaults <- RUN/config.yaml <- config file <- CLI overrides; written back to the run."""
    run_dir = Path(run_dir)
    existing = run_dir / CONFIG_FILE
    base = config_mod.from_dict(config_mod.read_file(existing)) if existing.is_file() else None
    values = config_mod.read_file(config_file) if config_file else {}
    cfg = config_mod.from_dict(config_mod.merge(values, overrides or {}), base)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        from .models.files import atomic_write_text
        atomic_write_text(existing, config_mod.dump(cfg))
    return cfg


def _need(value: str | None, what: str, flag: str) -> str:
    if not value:
        raise DataError(f"no {what} given", f"pass {flag} DIR (or set it in the config file)")
    return value


# -- data ----------------------------------------------------------------------------
def load_ms(cfg: RunConfig) -> PatchSet:
    ms = load_folder(_need(cfg.data.ms, "MS dataset", "--ms"), "ms", bands=cfg.data.bands)
    if not ms.labeled.all():
        raise DataError(f"the MS dataset {cfg.data.ms} has no class folders",
                        "the teacher needs labeled MS patches: root/<Class>/*.tif")
    require_classes(ms)
    if ms.num_bands <= 3:
        raise DataError(f"the MS dataset has {ms.num_bands} bands; a multispectral teacher needs more than 3",
                        "point --ms to the multispectral patches (e.g. 13 Sentinel-2 bands)")
    return ms


def _limit_per_class(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.choice(idx, size=min(limit, len(idx)), replace=False)))
    return np.sort(np.concatenate(keep))


def load_rgb_train(cfg: RunConfig, class_names: list[str]) -> PatchSet:
    """Labeled RGB (optionally at most N per class) followed by unlabeled RGB, one set."""
    parts: list[PatchSet] = []
    if cfg.data.rgb:
        rgb = load_folder(cfg.data.rgb, "rgb", class_names=class_names, known_from=MS_SET)
        if rgb.num_bands != 3:
            raise DataError(f"RGB dataset {cfg.data.rgb} has {rgb.num_bands} bands, not 3")
        if cfg.data.rgb_limit_per_class > 0:
            keep = _limit_per_class(rgb.labels, cfg.data.rgb_limit_per_class, cfg.seed)
            rest = rgb.subset(np.setdiff1d(np.arange(len(rgb)), keep))
            rgb = rgb.subset(keep)
            if cfg.data.rgb_rest_unlabeled and len(rest):
                rest.labels[:] = -1
                parts.append(rest)
        parts.insert(0, rgb)
    if cfg.data.rgb_unlabeled:
        unl = load_folder(cfg.data.rgb_unlabeled, "rgb", class_names=class_names, known_from=MS_SET)
        unl.labels[:] = -1  # a labeled folder given as unlabeled is used without its labels
        parts.append(unl)
    if not parts:
        raise DataError("no RGB training data given", "pass --rgb DIR (labeled) and/or --rgb-unlabeled DIR")
    if len(parts) == 1:
        return parts[0]
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DataError(f"labeled and unlabeled RGB patches differ in shape: {sorted(shapes)}",
                        "use patches of one size and band count")
    return PatchSet(images=np.concatenate([p.images for p in parts]),
                    labels=np.concatenate([p.labels for p in parts]), class_names=class_names,
                    band_names=parts[0].band_names, stems=[s for p in parts for s in p.stems],
                    paths=[s for p in parts for s in p.paths], modality="rgb", gsd=parts[0].gsd)


def student_classes(cfg: RunConfig, rgb: PatchSet) -> list[str]:
    """The classes the student learns and predicts: those of its RGB labels (in the teacher's
    order), or all the teacher's with `distill.all_teacher_classes` or without RGB labels.
    An RGB sensor often covers only some of the MS classes; a class with no RGB label would
    be learned from the MS side alone and predicted on scenes of the RGB sensor."""
    present = [c for c, n in rgb.class_counts().items() if n > 0]
    if cfg.distill.all_teacher_classes or not present:
        return list(rgb.class_names)
    return present


def load_student_rgb(cfg: RunConfig, ms: PatchSet, events: Events = NULL_EVENTS) -> PatchSet:
    """The RGB training set labelled in the student's classes (see `student_classes`)."""
    rgb = load_rgb_train(cfg, ms.class_names)
    classes = student_classes(cfg, rgb)
    if len(classes) < len(ms.class_names):
        left = [c for c in ms.class_names if c not in classes]
        events.log(f"the student learns the {len(classes)} classes of its RGB labels; the teacher's "
                   f"{', '.join(left)} left out (distill.all_teacher_classes=true keeps them)")
    return rgb.restrict_classes(classes)


def load_rgb_test(cfg: RunConfig, class_names: list[str]) -> PatchSet | None:
    if not cfg.data.rgb_test:
        return None
    return load_folder(cfg.data.rgb_test, "rgb", class_names=class_names,
                       known_from="the student's classes (those of the RGB labels)")


# -- input checks --------------------------------------------------------------------
# The folders each step reads (config key under `data`); `run` reads them all.
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "teacher": ("ms",),
    "matcher": ("ms", "rgb_paired"),
    "pair": ("ms", "rgb", "rgb_unlabeled"),
    "distill": ("ms", "rgb", "rgb_unlabeled", "rgb_test", "rgb_paired"),
    "run": ("ms", "rgb", "rgb_unlabeled", "rgb_test", "rgb_paired"),
}
_INPUT_NAMES = {"ms": ("MS dataset", "--ms"), "rgb": ("labeled RGB folder", "--rgb"),
                "rgb_unlabeled": ("unlabeled RGB folder", "--rgb-unlabeled"),
                "rgb_paired": ("paired RGB folder", "--rgb-paired"), "rgb_test": ("RGB test folder", "--rgb-test")}


def check_inputs(cfg: RunConfig, step: str, events: Events = NULL_EVENTS) -> None:
    """Refuse in seconds, before `step` trains, an input folder that would fail it later:
    each folder laid out as a dataset, its class names known to the MS set, its first patch
    readable, with more than 3 bands for the MS set and exactly 3 for every RGB set. Skipped
    folders are reported on `events` (see `scan_folder`)."""
    from .data.patches import check_known_classes, read_image, scan_folder
    keys = [k for k in STEP_INPUTS[step] if k != "rgb_paired" or step != "distill" or cfg.distill.ms_rows]
    ms_classes: list[str] = []
    for key in keys:
        root = getattr(cfg.data, key)
        what, flag = _INPUT_NAMES[key]
        if key == "ms":
            root = _need(root, what, flag)
        if not root:
            continue
        classes, items = scan_folder(Path(root), events.warning)
        bands = read_image(items[0][0])[0].shape[0]
        if key == "ms":
            ms_classes = classes
            if bands <= 3:
                raise DataError(f"the MS dataset {root} has {bands} bands; a multispectral teacher needs more "
                                "than 3", "point --ms to the multispectral patches (e.g. 13 Sentinel-2 bands)")
            continue
        if bands != 3:
            raise DataError(f"the {what} {root} ({flag}) has {bands} bands (e.g. {items[0][0].name}); "
                            "an RGB set needs 3", f"point {flag} to the RGB images, not to the MS patches")
        if ms_classes:
            check_known_classes(classes, ms_classes, f"the {what} {root}", MS_SET)


# -- steps ---------------------------------------------------------------------------
def train_context(cfg: RunConfig, events: Events = NULL_EVENTS, resume: bool = False) -> TrainContext:
    """What every trainer shares, from the run's config (the trainers take their own
    sections besides)."""
    return TrainContext(device=resolve_device(cfg.device), amp=cfg.amp, seed=cfg.seed,
                        checkpoint_every=cfg.checkpoint_every, resume=resume, events=events)


def step_teacher(cfg: RunConfig, run_dir: Path, events: Events = NULL_EVENTS, resume: bool = False) -> dict:
    check_inputs(cfg, "teacher", events)
    from .train.outputs import write_outputs
    from .train.teacher import train_teacher
    folder = RunFolder(run_dir).teacher
    with events.step("teacher"):
        ms = load_ms(cfg)
        events.log(f"teacher: {len(ms)} MS patches, {ms.num_bands} bands, classes {ms.class_counts()}")
        trained = train_teacher(cfg.teacher, ms, folder, train_context(cfg, events, resume))
        write_outputs(trained, folder, events)
        events.result("teacher", model=folder)
    distributed.barrier()  # under torchrun: the teacher's files exist for every rank
    return trained.metrics


def load_rgb_paired(cfg: RunConfig, class_names: list[str]) -> PatchSet | None:
    """The RGB images of MS samples' own targets (files sharing their stems), when given."""
    if not cfg.data.rgb_paired:
        return None
    return load_folder(cfg.data.rgb_paired, "rgb", class_names=class_names, known_from=MS_SET)


def step_matcher(cfg: RunConfig, run_dir: Path, events: Events = NULL_EVENTS, resume: bool = False) -> dict:
    check_inputs(cfg, "matcher", events)
    from .train.matcher import train_matcher
    from .train.outputs import write_outputs
    folder = RunFolder(run_dir).matcher
    with events.step("matcher"):
        ms = load_ms(cfg)
        paired = load_rgb_paired(cfg, ms.class_names)
        trained = train_matcher(cfg.matcher, ms, paired, folder, train_context(cfg, events, resume))
        write_outputs(trained, folder, events)
        events.result("matcher", model=folder)
    distributed.barrier()
    return trained.metrics


def step_pair(cfg: RunConfig, run_dir: Path, events: Events = NULL_EVENTS) -> dict:
    """Pair every RGB sample (under torchrun on rank 0, the others wait for its file)."""
    check_inputs(cfg, "pair", events)
    return distributed.on_main(_pair, cfg, run_dir, events) or {}


def _pair(cfg: RunConfig, run_dir: Path, events: Events) -> dict:
    from .train import common
    from .train.evaluate import write_metrics_json
    from .train.matcher import embed, load_matcher
    from .train.pairing import PAIRING, PairingOptions, pairing_stats
    run = RunFolder(run_dir)
    with events.step("pair"):
        teacher_ms = load_ms(cfg)
        rgb = load_student_rgb(cfg, teacher_ms)
        ms = teacher_ms.restrict_classes(rgb.class_names)  # partners of the student's classes only
        model, meta = load_matcher(run.matcher)
        ctx = train_context(cfg, events)
        model = model.to(ctx.device)
        z_ms = embed(model.ms, common.normalize(ms.images, meta.ms_mean, meta.ms_std), ctx.device)
        rgb_mean, rgb_std = common.band_stats(rgb.images)  # each RGB set standardised on itself
        z_rgb = embed(model.rgb, common.normalize(rgb.images, rgb_mean, rgb_std), ctx.device)
        sim = (z_rgb @ z_ms.T).numpy()
        options = PairingOptions(cfg.pairing.sinkhorn_iters, cfg.pairing.epsilon, seed=ctx.seed_for(seeds.PAIRING))
        assign = PAIRING[cfg.pairing.method].assign(sim, rgb.labels, ms.labels, options)
        probs = matcher_class_probs(sim, ms.labels, len(ms.class_names))
        lab = rgb.labels >= 0
        # Labeled samples are paired in their own class: full confidence. Unlabeled ones are
        # trusted as far as the matcher's neighbours agree on a class.
        confidence = np.where(lab, 1.0, probs.max(1)).astype(np.float32)
        out = run.pairs
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(run.pairs_file, ms_index=assign, rgb_stems=np.array(rgb.stems),
                 score=sim[np.arange(len(assign)), assign], confidence=confidence)
        stats = pairing_stats(assign, ms.labels)
        summary = {"rgb_samples": len(rgb), "unlabeled": int((~lab).sum()), "ms_samples": len(ms),
                   "method": cfg.pairing.method, **stats,
                   "matcher_accuracy_on_labeled_rgb": float((probs[lab].argmax(1) == rgb.labels[lab]).mean())
                   if lab.any() else None,
                   "unlabeled_mean_confidence": float(confidence[~lab].mean()) if (~lab).any() else None}
        write_metrics_json(run.metrics(layout.PAIRS), {"step": layout.PAIRS, "summary": summary})
        events.metrics("pair", summary)
        events.result("pair", pairs=run.pairs_file)
    return summary


def matcher_class_probs(sim: np.ndarray, ms_labels: np.ndarray, num_classes: int, k: int = 10,
                        temperature: float = 0.1) -> np.ndarray:
    """Class probabilities of each RGB row from its k most similar MS samples (soft vote)."""
    k = min(k, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sim, top, axis=1) / temperature
    w = np.exp(s - s.max(1, keepdims=True))
    probs = np.zeros((len(sim), num_classes))
    np.add.at(probs, (np.repeat(np.arange(len(sim)), k), ms_labels[top].ravel()), w.ravel())
    return probs / probs.sum(1, keepdims=True)


def load_pairs(run_dir: Path, rgb: PatchSet) -> tuple[np.ndarray, np.ndarray]:
    """MS partner index and pairing confidence of every RGB training sample."""
    path = RunFolder(run_dir).pairs_file
    if not path.is_file():
        raise DataError(f"{path} does not exist", "run `asymkd pair --run RUN` first")
    data = read_npz(path.parent, path.name, ("ms_index", "rgb_stems", "confidence"))
    if list(data["rgb_stems"]) != rgb.stems:
        raise DataError("the RGB training set differs from the one that was paired",
                        "run `asymkd pair` again with the same RGB folders")
    return data["ms_index"], data["confidence"]


def step_distill(cfg: RunConfig, run_dir: Path, events: Events = NULL_EVENTS, resume: bool = False,
                 skip_done: bool = False) -> dict:
    check_inputs(cfg, "distill", events)
    from .report import write_report
    from .train.distill import StudentInputs
    run = RunFolder(run_dir)
    ms = load_ms(cfg)
    rgb = load_student_rgb(cfg, ms, events)
    test = load_rgb_test(cfg, rgb.class_names)
    ctx = train_context(cfg, events, resume)
    results = {}
    if not (skip_done and run.metrics(layout.STUDENT).is_file()):
        with events.step("distill"):
            pairs, confidence = load_pairs(run.root, rgb)
            paired = load_rgb_paired(cfg, ms.class_names) if cfg.distill.ms_rows else None
            inputs = StudentInputs(rgb, ms, run.teacher, pairs, confidence, paired, test)
            results[layout.STUDENT] = _student(cfg, inputs, run.student, ctx, baseline=False)
            events.result("distill", model=run.student)
    if cfg.distill.baseline and not (skip_done and run.metrics(layout.BASELINE).is_file()):
        with events.step("baseline"):
            inputs = StudentInputs(rgb, ms, rgb_test=test)
            results[layout.BASELINE] = _student(cfg, inputs, run.baseline, ctx, baseline=True)
            events.result("baseline", model=run.baseline)
    # rank 0 alone writes the report; every rank returns once it is there
    distributed.on_main(lambda: events.result("report", report=write_report(run.root)))
    return results


def _student(cfg: RunConfig, inputs: StudentInputs, folder: Path, ctx: TrainContext, baseline: bool) -> dict:
    """Train one student (distilled or baseline) into `folder`; its metrics."""
    from .train.distill import student_gsd, train_student
    from .train.outputs import write_outputs
    gsd = student_gsd(inputs.rgb, inputs.ms, cfg.data.rgb_gsd, ctx.events)
    trained = train_student(cfg.distill, inputs, folder, ctx, baseline=baseline, pairing=cfg.pairing,
                            val_fraction=cfg.data.val_fraction, gsd=gsd)
    write_outputs(trained, folder, ctx.events)
    return trained.metrics


def run_all(cfg: RunConfig, run_dir: Path, events: Events = NULL_EVENTS, resume: bool = False) -> Path:
    """teacher -> matcher -> pair -> distill (+ baseline) -> report."""
    check_inputs(cfg, "run", events)
    run = RunFolder(run_dir)

    def done(step: str) -> bool:
        return resume and run.metrics(step).is_file()

    if not done(layout.TEACHER):
        step_teacher(cfg, run.root, events, resume)
    if not done(layout.MATCHER):
        step_matcher(cfg, run.root, events, resume)
    if not done(layout.PAIRS):
        step_pair(cfg, run.root, events)
    step_distill(cfg, run.root, events, resume, skip_done=resume)
    return run.report
