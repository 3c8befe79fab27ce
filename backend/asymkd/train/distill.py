"""Steps 4-5: distil the frozen MS teacher into the RGB student, re-pairing every K steps.

For each RGB sample i and its MS partner j the loss is
    w_feat * domain_shift(CrossModalAttention(F2_i, F1_j))      (CORAL or MMD)
  + w_pseudo * trust_j * g * KD(student_i, teacher_j)           (KL at T, or hard CE)
  + w_gt * CE(student_i, y_i)                                   (labeled RGB only)
F1 and the teacher's soft labels are computed once: the teacher is frozen. trust_j is the
teacher's confidence on j where its out-of-fold prediction agrees with j's label (0 where
it does not); g lowers all pseudo-label terms once the student's validation accuracy nears
or passes the teacher's out-of-fold accuracy.

With `distill.ms_rows` the MS samples also train the distilled student as RGB rows: each
one's own target as the RGB sensor sees it (`data.same_target`), labeled with its class and
paired with itself for good (never re-paired), so its soft label and features are the
teacher's on that very target. The baseline is this same loop with only the ground-truth
term on the RGB samples alone: what an analyst gets without the MS side.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from .. import layout
from ..config import RunConfig
from ..data.patches import PatchSet
from ..data.same_target import SameTarget, same_target_rgb
from ..errors import DataError
from ..events import NULL_EVENTS, Events
from ..fileio import read_json, read_npy
from ..models.attention import CrossModalAttention
from ..models.backbones import SceneClassifier
from ..models.files import check_bands, load_model, save_model
from ..models.metadata import ModelMeta
from . import common, distributed, loop
from .classifier import ClassifierTask, Consistency, trained_rows
from .evaluate import classification_metrics, predict_probs, save_confusion_png, write_metrics_json
from .objectives import DistillObjective, SupervisedObjective
from .pairing import pairing_stats, repair_by_kl, repair_by_kl_balanced, repair_randomly
from .teacher import auto_epochs, auto_shift, build_classifier, start_source


@dataclass
class TeacherCache:
    """What the frozen teacher says about every MS sample, computed once."""

    features: torch.Tensor   # (N_ms, C_t, h, w) feature maps F1
    soft: torch.Tensor       # (N_ms, K) soft labels (out-of-fold where available)
    labels: torch.Tensor     # (N_ms,)
    trust: torch.Tensor      # (N_ms,) confidence where the soft label agrees with the label
    accuracy: float          # out-of-fold accuracy of the soft labels


def teacher_cache(teacher_dir: Path, ms: PatchSet, device: torch.device, amp: bool,
                  classes: list[str] | None = None) -> TeacherCache:
    """The teacher's features and soft labels of the labeled MS samples; with `classes` (the
    student's), of those classes' samples only, the soft labels restricted to those classes
    and renormalised, labels in their order: the rows of `ms.restrict_classes(classes)`."""
    model, meta = load_model(teacher_dir, device)
    check_bands(meta, ms.num_bands, "the MS dataset")
    index = read_json(teacher_dir, layout.MS_INDEX, ("stems",))
    if index["stems"] != [ms.stems[i] for i in np.flatnonzero(ms.labeled)]:
        raise DataError(f"the MS set differs from the one the teacher in {teacher_dir} was trained on",
                        "train the teacher again on this MS folder (asymkd teacher)")
    ms = ms.subset(np.flatnonzero(ms.labeled))
    soft = torch.as_tensor(read_npy(teacher_dir, layout.SOFT_LABELS, (len(ms), len(ms.class_names))),
                           dtype=torch.float32)
    if classes is not None and list(classes) != ms.class_names:
        rows = np.flatnonzero(np.isin(ms.labels, [ms.class_names.index(c) for c in classes]))
        cols = [ms.class_names.index(c) for c in classes]
        soft = soft[torch.as_tensor(rows)][:, cols]
        soft = soft / soft.sum(1, keepdim=True).clamp_min(1e-12)
        ms = ms.restrict_classes(classes)
    x = common.normalize(ms.images, meta.mean, meta.std)
    with torch.no_grad():
        feats = torch.cat([model.forward_features(xb.to(device)).float()
                           for xb in common.iterate_eval(x, 256)])
    labels = torch.as_tensor(ms.labels)
    agree = soft.argmax(1) == labels
    return TeacherCache(features=feats, soft=soft.to(device), labels=labels,
                        trust=(soft.max(1).values * agree).to(device),
                        accuracy=float(agree.float().mean()))


def teacher_gate(teacher_acc: float, student_val_acc: float | None) -> float:
    """Global trust in pseudo-labels: 1 while the student is well below the teacher,
    falling linearly to 0 as the student's validation accuracy passes it by 10 points."""
    if student_val_acc is None or np.isnan(student_val_acc):
        return 1.0
    return float(np.clip((teacher_acc + 0.10 - student_val_acc) / 0.15, 0.0, 1.0))


def _split(rgb: PatchSet, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    if cfg.data.val_fraction <= 0:  # every label trains; the last epoch is the model
        return np.arange(len(rgb)), np.zeros(0, np.int64)
    return common.stratified_split(rgb.labels, cfg.data.val_fraction, cfg.seed)


class DistillTask(ClassifierTask):
    """The student's task with distillation: records the student's latest prediction of
    every sample, re-pairs every K steps (step 5) and lowers the pseudo-label gate as the
    student's validation accuracy nears the teacher's."""

    def __init__(self, model: SceneClassifier, *, objective: DistillObjective, cache: TeacherCache,
                 rgb_labels: np.ndarray, repair_every: int, repair: Callable[..., np.ndarray],
                 fixed: np.ndarray, **kwargs: Any):
        super().__init__(model, objective, **kwargs)
        self.objective: DistillObjective = objective
        self.cache, self.rgb_labels = cache, rgb_labels
        # rows whose partner is their own target (the MS rows): never re-paired
        self.fixed = torch.as_tensor(fixed)
        self.repair_every, self.repair = repair_every, repair
        k = cache.soft.shape[1]
        self.logp_table = torch.full((len(rgb_labels), k), -float(np.log(k)))  # uniform until seen
        self.unused_parameters = objective.w_feat <= 0  # the attention then gets no gradient
        self._fresh: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # this rank's rows since the last sync
        self._batches = 0

    def batch_terms(self, index: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        batch, terms = self.forward_batch(index, gen)
        logp = F.log_softmax(batch.logits.detach(), -1).cpu()
        self.logp_table[batch.index] = logp
        self._batches += 1
        if self.shard.world > 1:
            self._fresh.append((self._batches, batch.index.cpu(), logp))
        return terms

    def _sync_table(self) -> None:
        """Under torchrun: every rank's latest predictions in every rank's table (the later
        batch wins where two ranks saw a row), so the table is the one process's."""
        if self.shard.world == 1:
            return
        updates = sorted((u for part in distributed.gather(self._fresh) for u in part), key=lambda u: u[0])
        for _, rows, logp in updates:
            self.logp_table[rows] = logp
        self._fresh = []

    def after_step(self, global_step: int) -> None:
        if self.repair_every < 0 or global_step % self.repair_every:
            return
        # Step 5: re-pair every RGB sample with the MS sample whose teacher output is closest
        # (KL) to the student's latest prediction; same class where labeled. Under torchrun
        # rank 0 pairs on the gathered predictions and every rank takes its pairs.
        self._sync_table()
        t = self.trained_rows()
        t = t[~self.fixed[t]]
        pairs = torch.zeros(len(t), dtype=torch.int64)
        if distributed.is_main() or self.shard.world == 1:
            pairs = torch.as_tensor(self.repair(
                self.logp_table[t].numpy(), self.cache.soft.cpu().numpy(), self.rgb_labels[t.numpy()],
                self.cache.labels.numpy()), dtype=torch.int64)
        if self.shard.world > 1:
            distributed.broadcast_(pairs)
        self.objective.partners[t] = pairs

    def end_epoch(self, epoch: int, record: dict) -> None:
        self._sync_table()  # a checkpoint carries the whole table
        super().end_epoch(epoch, record)
        self.objective.gate = teacher_gate(self.cache.accuracy, record.get("val_accuracy"))
        record["teacher_gate"] = self.objective.gate

    def state(self) -> dict:
        return {**super().state(), "gate": self.objective.gate, "pairs": self.objective.partners,
                "logp_table": self.logp_table}

    def load_state(self, extra: dict) -> None:
        super().load_state(extra)
        self.objective.gate = float(extra["gate"])
        self.objective.partners.copy_(extra["pairs"])
        self.logp_table = extra["logp_table"]


def _repair_function(cfg: RunConfig) -> Callable[..., Any]:
    """Step 5 for the configured pairing method: `random` stays random when re-pairing."""
    if cfg.pairing.method == "nearest":
        return repair_by_kl
    if cfg.pairing.method == "random":
        return partial(repair_randomly, gen=torch.Generator().manual_seed(cfg.seed + 211))
    return partial(repair_by_kl_balanced, sinkhorn_iters=cfg.pairing.sinkhorn_iters, epsilon=cfg.pairing.epsilon)


def _distill_objective(cfg: RunConfig, cache: TeacherCache, student: SceneClassifier, x: torch.Tensor,
                       pairs: np.ndarray, pair_confidence: np.ndarray | None,
                       device: torch.device) -> DistillObjective:
    dc = cfg.distill
    with torch.no_grad():
        student_channels = student.forward_features(x[:2].to(device)).shape[1]
    attention = CrossModalAttention(student_channels, cache.features.shape[1], dc.attention_dim,
                                    dc.attention_heads).to(device)
    # The teacher side's projection and norm stay fixed: trained, they could map every
    # teacher token to a constant and zero the domain loss without teaching anything.
    for p in [*attention.proj_teacher.parameters(), *attention.norm_teacher.parameters()]:
        p.requires_grad_(False)
    row_trust = torch.ones(len(x)) if pair_confidence is None else \
        torch.as_tensor(pair_confidence, dtype=torch.float32)
    return DistillObjective(soft=cache.soft, features=cache.features, trust=cache.trust,
                            partners=torch.as_tensor(pairs, dtype=torch.int64).clone(), row_trust=row_trust,
                            attention=attention, w_gt=dc.w_gt, w_pseudo=dc.w_pseudo, w_feat=dc.w_feat,
                            temperature=dc.temperature, pseudo=dc.pseudo, domain_loss=dc.domain_loss,
                            use_trust=dc.trust, label_smoothing=dc.label_smoothing)


@dataclass
class StudentData:
    """The RGB samples a student trains on, normalised with statistics of its training rows:
    the RGB set's, then the MS rows' (when given) after them."""

    x: torch.Tensor
    y: torch.Tensor
    train_index: np.ndarray          # labeled rows (and unlabeled ones without semi-supervision)
    val_index: np.ndarray
    consistency: Consistency | None  # the unlabeled rows with semi-supervision
    mean: list[float]
    std: list[float]
    ms_rows: SameTarget | None = None  # rows len(rgb) onwards


def ms_rows(cfg: RunConfig, ms: PatchSet, rgb: PatchSet, rgb_paired: PatchSet | None,
            events: Events = NULL_EVENTS) -> SameTarget | None:
    """The MS samples as RGB rows for the distilled student, resampled to the RGB patch size,
    or None where they cannot be (no true-colour bands: a warning says so)."""
    if not cfg.distill.ms_rows:
        return None
    try:
        rows = same_target_rgb(ms, rgb_paired, "auto", reference=rgb, size=rgb.size)
    except DataError as exc:  # e.g. no band near red, green or blue
        events.warning(f"distill: no MS rows: {exc}")
        return None
    events.log(f"distill: {len(rows)} MS samples train the student as RGB rows ({rows.source})")
    return rows


def _balanced(train_idx: np.ndarray, labels: np.ndarray, n_rgb: int) -> np.ndarray:
    """`train_idx` with its labeled RGB rows repeated until they are at least as many as the
    MS rows: with 5 RGB labels a class and 27 MS samples, the RGB sensor's own labels would
    otherwise be a sixth of every epoch and seen a quarter as often as by the baseline."""
    rgb_rows = train_idx[(train_idx < n_rgb) & (labels[train_idx] >= 0)]
    ms_rows = int((train_idx >= n_rgb).sum())
    repeat = -(-ms_rows // max(len(rgb_rows), 1)) - 1  # ceil(ms / rgb) - 1 more copies
    return np.concatenate([train_idx, *[rgb_rows] * repeat]) if repeat > 0 else train_idx


def attainable_confidence(label_smoothing: float, num_classes: int) -> float:
    """The highest probability training with label smoothing pulls a model towards: 1 - e + e/K.
    FixMatch's threshold is a share of it; 0.95 itself (above 0.9125 at e = 0.1, K = 8) would
    almost never be reached, and the unlabeled samples would teach nothing."""
    return 1.0 - label_smoothing + label_smoothing / max(num_classes, 1)


def student_data(cfg: RunConfig, rgb: PatchSet, baseline: bool, rows: SameTarget | None = None,
                 ms_labels: np.ndarray | None = None) -> StudentData:
    dc = cfg.distill
    train_idx, val_idx = _split(rgb, cfg)
    images, labels = rgb.images, rgb.labels
    if rows is not None and not baseline:
        assert ms_labels is not None
        images = np.concatenate([images, rows.images.astype(images.dtype)])
        labels = np.concatenate([labels, ms_labels[rows.ms_index]])
        train_idx = np.concatenate([train_idx, len(rgb) + np.arange(len(rows))])
        if dc.balance_rows:
            train_idx = _balanced(train_idx, labels, len(rgb))
    else:
        rows = None
    unlabeled = train_idx[labels[train_idx] < 0]
    consistency = None
    if dc.semi_supervised == "fixmatch" and len(unlabeled):
        # baseline and student alike: labeled batches, each with its share of unlabeled samples
        threshold = dc.fixmatch_threshold * attainable_confidence(dc.label_smoothing, len(rgb.class_names))
        consistency = Consistency(torch.as_tensor(unlabeled), dc.fixmatch_ratio, threshold, dc.w_unlabeled)
    if consistency is not None or baseline:  # without semi-supervision the baseline sees labels only
        train_idx = train_idx[labels[train_idx] >= 0]
    mean, std = common.band_stats(images[trained_rows(train_idx, consistency)])  # of the rows that train
    return StudentData(common.normalize(images, mean, std), torch.as_tensor(labels), train_idx, val_idx,
                       consistency, mean, std, rows)


def _student_task(cfg: RunConfig, data: StudentData, student: SceneClassifier, out_dir: Path, device: torch.device,
                  cache: TeacherCache | None, pairs: np.ndarray | None,
                  pair_confidence: np.ndarray | None) -> ClassifierTask:
    """The baseline's task (ground truth alone) or, with a teacher cache, the distillation's."""
    dc = cfg.distill
    kwargs: dict[str, Any] = dict(x=data.x, y=data.y, train_index=data.train_index, device=device, amp=cfg.amp,
                                  val_index=data.val_index, best_path=out_dir / "best.safetensors",
                                  consistency=data.consistency,
                                  shift=auto_shift(dc, int(data.x.shape[-1])))
    if cache is None:
        return ClassifierTask(student, objective=SupervisedObjective(dc.w_gt, dc.label_smoothing), **kwargs)
    assert pairs is not None
    fixed = np.zeros(len(data.y), dtype=bool)
    if data.ms_rows is not None:  # each MS row's partner is its own MS sample, fully trusted
        fixed[len(pairs):] = True
        pair_confidence = np.concatenate([np.ones(len(pairs)) if pair_confidence is None else pair_confidence,
                                          np.ones(len(data.ms_rows))])
        pairs = np.concatenate([pairs, data.ms_rows.ms_index])
    if dc.ms_rows_jitter and data.ms_rows is not None:
        kwargs["jitter_rows"] = torch.as_tensor(fixed)  # the MS rows
    objective = _distill_objective(cfg, cache, student, data.x, pairs, pair_confidence, device)
    if data.consistency is not None and not dc.teacher_on_unlabeled:  # FixMatch alone teaches those
        taught = torch.ones(len(data.y), dtype=torch.bool)
        taught[data.consistency.index] = False
        objective.taught = taught
    per_epoch = loop.steps_per_epoch(len(data.train_index), dc.batch_size)
    return DistillTask(student, objective=objective, cache=cache, rgb_labels=data.y.numpy(),
                       repair_every=dc.repair_every or per_epoch, repair=_repair_function(cfg), fixed=fixed,
                       **kwargs)


def train_student(cfg: RunConfig, rgb: PatchSet, out_dir: Path, *, baseline: bool,
                  teacher_dir: Path | None = None, ms: PatchSet | None = None,
                  pairs: np.ndarray | None = None, pair_confidence: np.ndarray | None = None,
                  rgb_paired: PatchSet | None = None, rgb_test: PatchSet | None = None,
                  events: Events = NULL_EVENTS, resume: bool = False) -> dict:
    """Train the RGB student (distilled, or the baseline) and evaluate it; returns metrics."""
    dc = cfg.distill
    out_dir = Path(out_dir)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    device = common.resolve_device(cfg.device)
    # the MS samples of the student's classes (the RGB set's): the rows `pairs` index
    student_ms = None if ms is None else ms.restrict_classes(rgb.class_names)
    rows = None if baseline or student_ms is None else ms_rows(cfg, student_ms, rgb, rgb_paired, events)
    data = student_data(cfg, rgb, baseline, rows, None if student_ms is None else student_ms.labels)
    gen = common.generator(cfg.seed + 101)
    source = start_source(dc)
    student = build_classifier(dc, 3, len(rgb.class_names), rgb.band_names, device)
    cache = None
    if not baseline:
        if teacher_dir is None or ms is None or pairs is None:
            raise ValueError("distillation needs the teacher, the MS set and the pairs")
        cache = teacher_cache(teacher_dir, ms, device, cfg.amp, rgb.class_names)
        distributed.broadcast_(cache.features, cache.soft, cache.trust)  # rank 0's, bit for bit
    task = _student_task(cfg, data, student, out_dir, device, cache, pairs, pair_confidence)
    epochs = auto_epochs(dc, len(data.train_index))
    checkpoint = common.Checkpoint(out_dir / layout.CHECKPOINT)
    settings = loop.LoopSettings("baseline" if baseline else "distill", epochs, dc.batch_size, dc.lr,
                                 dc.weight_decay, checkpoint, cfg.checkpoint_every, resume,
                                 fingerprint={"config": asdict(cfg), "data": rgb.identity(ms), "baseline": baseline,
                                              "ms_rows": None if rows is None else rows.ms_index.tolist()})
    gsd = student_gsd(cfg, rgb, ms, events)
    started = time.time()
    history = loop.fit(task, len(data.train_index), settings, gen, events)
    if not distributed.is_main():  # rank 0 evaluates and writes
        return {}
    metrics = _evaluate(task.final_model(), rgb, data.val_index, rgb_test, data.mean, data.std, history, out_dir,
                        "baseline" if baseline else "student")
    metrics["summary"] = _summary(cfg, task, data, rgb, cache, epochs, time.time() - started, source)
    if ms is not None:  # the classes the student knows, and the teacher's it was not taught
        metrics["summary"]["teacher_classes_left_out"] = [c for c in ms.class_names if c not in rgb.class_names]
    scores = {s: {m: metrics[s][m] for m in ("overall_accuracy", "macro_f1")} for s in ("val", "test") if s in metrics}
    meta = ModelMeta(backbone=task.model.backbone_name, class_names=rgb.class_names, band_names=rgb.band_names,
                     mean=data.mean, std=data.std, patch_size=rgb.size, role=metrics["step"], kind="student",
                     weights_source=source,
                     gsd=gsd, summary=metrics["summary"],
                     metrics=scores)
    save_model(out_dir, task.model, meta)
    write_metrics_json(out_dir / layout.METRICS, metrics)
    checkpoint.remove()
    events.metrics(metrics["step"], {**metrics["summary"], **scores})
    return metrics


def student_gsd(cfg: RunConfig, rgb: PatchSet, ms: PatchSet | None, events: Events = NULL_EVENTS) -> float | None:
    """The ground resolution the student's model file states, which classification tiles maps
    at: the RGB patches' own (georeferenced), else `data.rgb_gsd`, else the MS patches'."""
    if rgb.gsd:
        return rgb.gsd
    if cfg.data.rgb_gsd:
        return cfg.data.rgb_gsd
    ms_gsd = ms.gsd if ms is not None else None
    if ms_gsd and ms is not None and rgb.size != ms.size:  # another sensor, most likely
        events.warning(f"the RGB patches ({rgb.size} px) carry no ground resolution; the student takes the MS "
                       f"patches' {ms_gsd:g} m per pixel ({ms.size} px), so maps are tiled at that scale: give "
                       "the RGB sensor's with --rgb-gsd M (data.rgb_gsd)")
    return ms_gsd


def _summary(cfg: RunConfig, task: ClassifierTask, data: StudentData, rgb: PatchSet, cache: TeacherCache | None,
             epochs: int, seconds: float, source: str) -> dict[str, Any]:
    rows = task.trained_rows().numpy()
    rows = rows[rows < len(rgb)]  # the RGB set's (the MS rows are counted apart)
    summary: dict[str, Any] = {
        "rgb_train": int(len(rows)), "rgb_val": int(len(data.val_index)),
        "labeled_train": int((rgb.labels[rows] >= 0).sum()), "epochs": epochs,
        "semi_supervised": cfg.distill.semi_supervised if data.consistency is not None else "none",
        "best_val_accuracy": task.best_acc if len(data.val_index) else None, "train_seconds": round(seconds, 1),
        "backbone": cfg.distill.backbone, "weights_source": source, "input_size": cfg.distill.input_size,
        "shift": task.shift, "ms_rows": len(data.ms_rows) if data.ms_rows is not None else 0,
        "ms_rows_source": data.ms_rows.source if data.ms_rows is not None else None}
    if cache is not None and isinstance(task, DistillTask):
        stats = pairing_stats(task.objective.partners[task.trained_rows()].numpy(), cache.labels.numpy())
        summary.update(teacher_oof_accuracy=cache.accuracy, repair_every_steps=task.repair_every,
                       **{f"final_pairs_{k}": v for k, v in stats.items()})
    return summary


def _evaluate(student: SceneClassifier, rgb: PatchSet, val_idx: np.ndarray, rgb_test: PatchSet | None,
              mean: list[float], std: list[float], history: list[dict], out_dir: Path, step: str) -> dict:
    """Validation (when held back) and test scores of the trained student."""
    metrics: dict = {"step": step, "history": history}
    if len(val_idx):
        val_pred = predict_probs(student, rgb.images[val_idx], mean, std).argmax(1)
        metrics["val"] = classification_metrics(rgb.labels[val_idx], val_pred, rgb.class_names)
    if rgb_test is not None:
        pred = predict_probs(student, rgb_test.images, mean, std).argmax(1)
        metrics["test"] = classification_metrics(rgb_test.labels, pred, rgb.class_names)
        save_confusion_png(metrics["test"]["confusion"], rgb.class_names, out_dir / layout.CONFUSION,
                           f"{step}: test OA {metrics['test']['overall_accuracy']:.3f}")
    return metrics
