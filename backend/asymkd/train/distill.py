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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from .. import layout
from ..config import DistillConfig, PairingConfig
from ..data.patches import PatchSet
from ..data.same_target import SameTarget, same_target_rgb
from ..errors import DataError
from ..events import NULL_EVENTS, Events
from ..fileio import read_json, read_npy
from ..models.attention import CrossModalAttention
from ..models.backbones import SceneClassifier
from ..models.files import check_bands, load_model
from ..models.metadata import ModelMeta
from . import common, distributed, loop, seeds
from .classifier import ClassifierTask, Consistency, trained_rows
from .common import TrainContext
from .evaluate import classification_metrics, predict_probs
from .objectives import DistillObjective, SupervisedObjective
from .outputs import Confusion, Trained
from .pairing import PairingOptions, pairing_stats, repairer
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


def _split(rgb: PatchSet, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction <= 0:  # every label trains; the last epoch is the model
        return np.arange(len(rgb)), np.zeros(0, np.int64)
    return common.stratified_split(rgb.labels, val_fraction, seed)


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
        if self.shard.rank == 0:
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


def _distill_objective(dc: DistillConfig, cache: TeacherCache, student: SceneClassifier, x: torch.Tensor,
                       pairs: np.ndarray, pair_confidence: np.ndarray | None,
                       device: torch.device) -> DistillObjective:
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


def ms_rows(section: DistillConfig, ms: PatchSet, rgb: PatchSet, rgb_paired: PatchSet | None,
            events: Events = NULL_EVENTS) -> SameTarget | None:
    """The MS samples as RGB rows for the distilled student, resampled to the RGB patch size,
    or None where they cannot be (no true-colour bands: a warning says so)."""
    if not section.ms_rows:
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


def student_data(dc: DistillConfig, rgb: PatchSet, baseline: bool, rows: SameTarget | None = None,
                 ms_labels: np.ndarray | None = None, *, val_fraction: float = 0.0, seed: int = 0) -> StudentData:
    """The student's rows and their split: `val_fraction` of the labeled RGB held back (a
    split drawn from `seed`, the run's seed)."""
    train_idx, val_idx = _split(rgb, val_fraction, seed)
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


def _student_task(dc: DistillConfig, data: StudentData, student: SceneClassifier, ctx: TrainContext,
                  cache: TeacherCache | None, pairs: np.ndarray | None, pair_confidence: np.ndarray | None,
                  pairing: PairingConfig | None = None) -> ClassifierTask:
    """The baseline's task (ground truth alone) or, with a teacher cache, the distillation's,
    re-pairing by `pairing`'s method."""
    kwargs: dict[str, Any] = dict(x=data.x, y=data.y, train_index=data.train_index, device=ctx.device,
                                  amp=ctx.amp, val_index=data.val_index, consistency=data.consistency,
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
    objective = _distill_objective(dc, cache, student, data.x, pairs, pair_confidence, ctx.device)
    if data.consistency is not None and not dc.teacher_on_unlabeled:  # FixMatch alone teaches those
        taught = torch.ones(len(data.y), dtype=torch.bool)
        taught[data.consistency.index] = False
        objective.taught = taught
    per_epoch = loop.steps_per_epoch(len(data.train_index), dc.batch_size)
    pairing = pairing or PairingConfig()
    repair = repairer(pairing.method, PairingOptions(pairing.sinkhorn_iters, pairing.epsilon,
                                                     seed=ctx.seed_for(seeds.REPAIR)))
    return DistillTask(student, objective=objective, cache=cache, rgb_labels=data.y.numpy(),
                       repair_every=dc.repair_every or per_epoch, repair=repair, fixed=fixed, **kwargs)


@dataclass
class StudentInputs:
    """The data a student trains on: the RGB set (in the student's classes) and, to distil,
    the MS set, the teacher's folder and each RGB sample's MS partner."""

    rgb: PatchSet
    ms: PatchSet | None = None
    teacher_dir: Path | None = None
    pairs: np.ndarray | None = None              # the pair step's partners (rows of the student's MS)
    pair_confidence: np.ndarray | None = None
    rgb_paired: PatchSet | None = None           # the MS targets in RGB, for the MS rows
    rgb_test: PatchSet | None = None             # scored, never trained on


def _teacher_cache(inputs: StudentInputs, ctx: TrainContext) -> TeacherCache:
    if inputs.teacher_dir is None or inputs.ms is None or inputs.pairs is None:
        raise ValueError("distillation needs the teacher, the MS set and the pairs")
    cache = teacher_cache(inputs.teacher_dir, inputs.ms, ctx.device, ctx.amp, inputs.rgb.class_names)
    distributed.broadcast_(cache.features, cache.soft, cache.trust)  # rank 0's, bit for bit
    return cache


def train_student(section: DistillConfig, inputs: StudentInputs, work_dir: Path, ctx: TrainContext, *,
                  baseline: bool, pairing: PairingConfig | None = None, val_fraction: float = 0.0,
                  gsd: float | None = None) -> Trained:
    """Train the RGB student (distilled, or the baseline) and evaluate it. `work_dir` holds
    its checkpoint; `pairing` is how the distilled student re-pairs, `val_fraction` the share
    of labeled RGB held back, `gsd` the ground resolution its model states (`student_gsd`)."""
    rgb, ms = inputs.rgb, inputs.ms
    # the MS samples of the student's classes (the RGB set's): the rows `pairs` index
    student_ms = None if ms is None else ms.restrict_classes(rgb.class_names)
    rows = None if baseline or student_ms is None else ms_rows(section, student_ms, rgb, inputs.rgb_paired,
                                                                ctx.events)
    data = student_data(section, rgb, baseline, rows, None if student_ms is None else student_ms.labels,
                        val_fraction=val_fraction, seed=ctx.seed)
    gen = ctx.generator(seeds.STUDENT)  # before the network: the baseline starts where the student does
    student = build_classifier(section, 3, len(rgb.class_names), rgb.band_names, ctx.device)
    cache = None if baseline else _teacher_cache(inputs, ctx)
    task = _student_task(section, data, student, ctx, cache, inputs.pairs, inputs.pair_confidence, pairing)
    epochs = auto_epochs(section, len(data.train_index))
    # what a resumed run must share: this section, the pairing, the split and the data (not
    # where it runs, how often it checkpoints, or what it is tested on)
    fingerprint = {"config": asdict(section), "pairing": None if baseline else asdict(pairing or PairingConfig()),
                   "split": {"val_fraction": val_fraction, "seed": ctx.seed}, "data": rgb.identity(ms),
                   "baseline": baseline, "ms_rows": None if rows is None else rows.ms_index.tolist()}
    settings = loop.LoopSettings("baseline" if baseline else "distill", epochs, section.batch_size, section.lr,
                                 section.weight_decay, common.Checkpoint(Path(work_dir) / layout.CHECKPOINT),
                                 ctx.checkpoint_every, ctx.resume, fingerprint=fingerprint)
    started = time.time()
    history = loop.fit(task, len(data.train_index), settings, gen, ctx.events)
    step = "baseline" if baseline else "student"
    metrics = _evaluate(task.final_model(), rgb, data.val_index, inputs.rgb_test, data.mean, data.std, history, step)
    metrics["summary"] = _summary(section, task, data, rgb, cache, epochs, time.time() - started)
    if ms is not None:  # the classes the student knows, and the teacher's it was not taught
        metrics["summary"]["teacher_classes_left_out"] = [c for c in ms.class_names if c not in rgb.class_names]
    return _student_outputs(section, task, data, rgb, metrics, gsd)


def _student_outputs(section: DistillConfig, task: ClassifierTask, data: StudentData, rgb: PatchSet,
                     metrics: dict[str, Any], gsd: float | None) -> Trained:
    step = metrics["step"]
    scores = {s: {m: metrics[s][m] for m in ("overall_accuracy", "macro_f1")} for s in ("val", "test") if s in metrics}
    meta = ModelMeta(backbone=task.model.backbone_name, class_names=rgb.class_names, band_names=rgb.band_names,
                     mean=data.mean, std=data.std, patch_size=rgb.size, role=step, kind="student",
                     weights_source=start_source(section), gsd=gsd, summary=metrics["summary"], metrics=scores)
    confusion = None
    if "test" in metrics:
        confusion = Confusion(metrics["test"]["confusion"], rgb.class_names,
                              f"{step}: test OA {metrics['test']['overall_accuracy']:.3f}")
    return Trained(step, task.model, meta, metrics, {**metrics["summary"], **scores}, confusion=confusion)


def student_gsd(rgb: PatchSet, ms: PatchSet | None, rgb_gsd: float = 0.0,
                events: Events = NULL_EVENTS) -> float | None:
    """The ground resolution the student's model file states, which classification tiles maps
    at: the RGB patches' own (georeferenced), else `rgb_gsd` (data.rgb_gsd), else the MS
    patches'."""
    if rgb.gsd:
        return rgb.gsd
    if rgb_gsd:
        return rgb_gsd
    ms_gsd = ms.gsd if ms is not None else None
    if ms_gsd and ms is not None and rgb.size != ms.size:  # another sensor, most likely
        events.warning(f"the RGB patches ({rgb.size} px) carry no ground resolution; the student takes the MS "
                       f"patches' {ms_gsd:g} m per pixel ({ms.size} px), so maps are tiled at that scale: give "
                       "the RGB sensor's with --rgb-gsd M (data.rgb_gsd)")
    return ms_gsd


def _summary(section: DistillConfig, task: ClassifierTask, data: StudentData, rgb: PatchSet,
             cache: TeacherCache | None, epochs: int, seconds: float) -> dict[str, Any]:
    rows = task.trained_rows().numpy()
    rows = rows[rows < len(rgb)]  # the RGB set's (the MS rows are counted apart)
    summary: dict[str, Any] = {
        "rgb_train": int(len(rows)), "rgb_val": int(len(data.val_index)),
        "labeled_train": int((rgb.labels[rows] >= 0).sum()), "epochs": epochs,
        "semi_supervised": section.semi_supervised if data.consistency is not None else "none",
        "best_val_accuracy": task.best_acc if len(data.val_index) else None, "train_seconds": round(seconds, 1),
        "backbone": section.backbone, "weights_source": start_source(section), "input_size": section.input_size,
        "shift": task.shift, "ms_rows": len(data.ms_rows) if data.ms_rows is not None else 0,
        "ms_rows_source": data.ms_rows.source if data.ms_rows is not None else None}
    if cache is not None and isinstance(task, DistillTask):
        stats = pairing_stats(task.objective.partners[task.trained_rows()].numpy(), cache.labels.numpy())
        summary.update(teacher_oof_accuracy=cache.accuracy, repair_every_steps=task.repair_every,
                       **{f"final_pairs_{k}": v for k, v in stats.items()})
    return summary


def _evaluate(student: SceneClassifier, rgb: PatchSet, val_idx: np.ndarray, rgb_test: PatchSet | None,
              mean: list[float], std: list[float], history: list[dict], step: str) -> dict:
    """Validation (when held back) and test scores of the trained student."""
    metrics: dict = {"step": step, "history": history}
    if len(val_idx):
        val_pred = predict_probs(student, rgb.images[val_idx], mean, std).argmax(1)
        metrics["val"] = classification_metrics(rgb.labels[val_idx], val_pred, rgb.class_names)
    if rgb_test is not None:
        pred = predict_probs(student, rgb_test.images, mean, std).argmax(1)
        metrics["test"] = classification_metrics(rgb_test.labels, pred, rgb.class_names)
    return metrics
