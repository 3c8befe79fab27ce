"""Steps 4-5: distil the frozen MS teacher into the RGB student, re-pairing every K steps.

For each RGB sample i and its MS partner j the loss is
    w_feat * domain_shift(CrossModalAttention(F2_i, F1_j))      (CORAL or MMD)
  + w_pseudo * trust_j * g * KD(student_i, teacher_j)           (KL at T, or hard CE)
  + w_gt * CE(student_i, y_i)                                   (labeled RGB only)
F1 and the teacher's soft labels are computed once: the teacher is frozen. trust_j is the
teacher's confidence on j where its out-of-fold prediction agrees with j's label (0 where
it does not); g lowers all pseudo-label terms once the student's validation accuracy nears
or passes the teacher's out-of-fold accuracy. The baseline is this same loop with only the
ground-truth term, so baseline and student differ in distillation alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from ..config import RunConfig
from ..data.patches import PatchSet
from ..errors import DataError
from ..events import NULL_EVENTS, Events
from ..models.attention import CrossModalAttention
from ..models.backbones import SceneClassifier
from ..models.files import check_bands, load_model, save_model, save_state
from ..models.losses import coral_loss, kd_loss, mmd_loss
from . import common
from .evaluate import classification_metrics, save_confusion_png, write_metrics_json
from .pairing import pairing_stats, repair_by_kl, repair_by_kl_balanced


@dataclass
class TeacherCache:
    """What the frozen teacher says about every MS sample, computed once."""

    features: torch.Tensor   # (N_ms, C_t, h, w) feature maps F1
    soft: torch.Tensor       # (N_ms, K) soft labels (out-of-fold where available)
    labels: torch.Tensor     # (N_ms,)
    trust: torch.Tensor      # (N_ms,) confidence where the soft label agrees with the label
    accuracy: float          # out-of-fold accuracy of the soft labels


def teacher_cache(teacher_dir: Path, ms: PatchSet, device: torch.device, amp: bool) -> TeacherCache:
    model, meta = load_model(teacher_dir, device)
    check_bands(meta, ms.num_bands, "the MS dataset")
    index = json.loads((Path(teacher_dir) / "ms_index.json").read_text())
    if index["stems"] != [ms.stems[i] for i in np.flatnonzero(ms.labeled)]:
        raise DataError(f"the MS set differs from the one the teacher in {teacher_dir} was trained on",
                        "train the teacher again on this MS folder (asymkd teacher)")
    ms = ms.subset(np.flatnonzero(ms.labeled))
    x = common.normalize(ms.images, meta["mean"], meta["std"])
    with torch.no_grad():
        feats = torch.cat([model.forward_features(xb.to(device)).float()
                           for xb in common.iterate_eval(x, 256)])
    soft = torch.as_tensor(np.load(Path(teacher_dir) / "soft_labels.npy"), dtype=torch.float32)
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
    return common.stratified_split(rgb.labels, cfg.data.val_fraction, cfg.seed)


def train_student(cfg: RunConfig, rgb: PatchSet, out_dir: Path, *, baseline: bool,
                  teacher_dir: Path | None = None, ms: PatchSet | None = None,
                  pairs: np.ndarray | None = None, pair_confidence: np.ndarray | None = None,
                  rgb_test: PatchSet | None = None,
                  events: Events = NULL_EVENTS, resume: bool = False) -> dict:
    """Train the RGB student (distilled, or the baseline) and evaluate it; returns metrics."""
    dc = cfg.distill
    step = "baseline" if baseline else "distill"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = common.resolve_device(cfg.device)
    train_idx, val_idx = _split(rgb, cfg)
    if baseline:  # the baseline sees labeled samples only
        train_idx = train_idx[rgb.labels[train_idx] >= 0]
    mean, std = common.band_stats(rgb.images[train_idx])
    x = common.normalize(rgb.images, mean, std)
    y = torch.as_tensor(rgb.labels)
    k = len(rgb.class_names)
    gen = common.generator(cfg.seed + 101)
    student = common.prepare_model(SceneClassifier(dc.backbone, 3, k, weights=dc.weights), device)
    modules: dict = {"student": student}
    cache = None
    if not baseline:
        if teacher_dir is None or ms is None or pairs is None:
            raise ValueError("distillation needs the teacher, the MS set and the pairs")
        cache = teacher_cache(teacher_dir, ms, device, cfg.amp)
        with torch.no_grad():
            student_channels = student.forward_features(x[:2].to(device)).shape[1]
        attention = CrossModalAttention(student_channels, cache.features.shape[1], dc.attention_dim,
                                        dc.attention_heads).to(device)
        # The teacher side's projection and norm stay fixed: trained, they could map every
        # teacher token to a constant and zero the domain loss without teaching anything.
        for p in [*attention.proj_teacher.parameters(), *attention.norm_teacher.parameters()]:
            p.requires_grad_(False)
        modules["attention"] = attention
        pairs = torch.as_tensor(pairs, dtype=torch.int64).clone()
        row_trust = torch.ones(len(rgb)) if pair_confidence is None else \
            torch.as_tensor(pair_confidence, dtype=torch.float32)
        logp_table = torch.full((len(rgb), k), -float(np.log(k)))  # uniform until seen
    params = [p for m in modules.values() for p in m.parameters()]
    steps_per_epoch = len(common.batches(len(train_idx), dc.batch_size, torch.Generator()))
    epochs = common.epochs_for(dc.epochs, dc.min_steps, steps_per_epoch, auto_floor=10)
    total_steps = epochs * steps_per_epoch
    opt, sched = common.optimizer_and_schedule(params, dc.lr, dc.weight_decay, total_steps)
    repair_every = dc.repair_every or steps_per_epoch
    repair = (lambda *a: repair_by_kl_balanced(*a, sinkhorn_iters=cfg.pairing.sinkhorn_iters,  # noqa: E731
                                               epsilon=cfg.pairing.epsilon)) \
        if cfg.pairing.method == "balanced" else repair_by_kl
    ckpt = common.Checkpoint(out_dir / "checkpoint.pt")
    best_path = out_dir / "best.safetensors"
    start, history, best_acc, gate = 0, [], -1.0, 1.0
    state_modules = {**modules, "opt": opt, "sched": sched}
    if resume and ckpt.exists():
        start, extra = ckpt.load(state_modules, gen)
        history, best_acc, gate = json.loads(extra["history"]), float(extra["best_acc"]), float(extra["gate"])
        if not baseline:
            pairs, logp_table = extra["pairs"], extra["logp_table"]
        events.log(f"{step}: resumed at epoch {start}")
    train_t = torch.as_tensor(train_idx)
    started = time.time()
    global_step = start * steps_per_epoch
    for epoch in range(start, epochs):
        for m in modules.values():
            m.train()
        sums: dict[str, float] = {}
        epoch_start = time.perf_counter()
        for b_local in common.batches(len(train_idx), dc.batch_size, gen):
            b = train_t[b_local]
            xb = common.dihedral(x[b], gen).to(device)
            yb = y[b].to(device)
            with common.autocast(device, cfg.amp):
                feats = student.forward_features(xb)
                logits = student.forward_head(feats).float()
            terms = {}
            lab = yb >= 0
            if lab.any():
                terms["gt"] = dc.w_gt * F.cross_entropy(logits[lab], yb[lab], label_smoothing=dc.label_smoothing)
            if cache is not None:
                j = pairs[b].to(device)
                weights = cache.trust[j] * row_trust[b].to(device) * gate if dc.trust else None
                terms["pseudo"] = dc.w_pseudo * kd_loss(logits, cache.soft[j], dc.temperature, dc.pseudo,
                                                        weights=weights, teacher_kind="probs")
                if dc.w_feat > 0:
                    s_tok, t_tok = attention(feats.float(), cache.features[j])
                    dom = coral_loss if dc.domain_loss == "coral" else mmd_loss
                    terms["feat"] = dc.w_feat * dom(s_tok.reshape(-1, s_tok.shape[-1]),
                                                    t_tok.reshape(-1, t_tok.shape[-1]))
                logp_table[b] = F.log_softmax(logits.detach(), -1).cpu()
            loss = sum(terms.values())
            common.optimiser_step(loss, opt, sched)
            global_step += 1
            for name, v in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + v.item()
            if cache is not None and global_step % repair_every == 0:
                # Step 5: re-pair every RGB sample with the MS sample whose teacher output is
                # closest (KL) to the student's latest prediction; same class where labeled.
                pairs[train_t] = torch.as_tensor(repair(
                    logp_table[train_t].numpy(), cache.soft.cpu().numpy(),
                    rgb.labels[train_idx], cache.labels.numpy()), dtype=torch.int64)
        epoch_seconds = time.perf_counter() - epoch_start
        val_logits = common.predict_logits(student, x[val_idx], device, amp=cfg.amp)
        val_acc = common.accuracy(val_logits, y[val_idx])
        if cache is not None:
            gate = teacher_gate(cache.accuracy, val_acc)
        record = {"epoch": epoch + 1, **{f"train_{n}": s / steps_per_epoch for n, s in sums.items()},
                  "val_accuracy": val_acc, "lr": sched.get_last_lr()[0], "epoch_seconds": epoch_seconds}
        if cache is not None:
            record["teacher_gate"] = gate
        history.append(record)
        if val_acc >= best_acc:  # model selection on validation, never on test
            best_acc = val_acc
            save_state(best_path, student.state_dict())
        events.progress(step, (epoch + 1) * steps_per_epoch, total_steps, started, unit="step",
                        epoch=epoch + 1, loss=record["train_loss"], val_accuracy=val_acc)
        extra = {"history": json.dumps(history), "best_acc": best_acc, "gate": gate}
        if cache is not None:
            extra.update(pairs=pairs, logp_table=logp_table)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == epochs:
            ckpt.save(epoch + 1, state_modules, gen, extra)
    student.load_state_dict(load_file(str(best_path)))
    student = student.cpu().eval()
    val_logits = common.predict_logits(student, x[val_idx], torch.device("cpu"), amp=False)
    metrics: dict = {"step": "baseline" if baseline else "student",
                     "val": classification_metrics(rgb.labels[val_idx], val_logits.argmax(1).numpy(), rgb.class_names),
                     "history": history}
    summary = {"rgb_train": int(len(train_idx)), "rgb_val": int(len(val_idx)),
               "labeled_train": int((rgb.labels[train_idx] >= 0).sum()), "epochs": epochs,
               "best_val_accuracy": best_acc, "train_seconds": round(time.time() - started, 1)}
    if cache is not None:
        summary.update(teacher_oof_accuracy=cache.accuracy, repair_every_steps=repair_every,
                       **{f"final_pairs_{k_}": v for k_, v in
                          pairing_stats(pairs[train_t].numpy(), cache.labels.numpy()).items()})
    if rgb_test is not None:
        test_x = common.normalize(rgb_test.images, mean, std)
        pred = common.predict_logits(student, test_x, torch.device("cpu"), amp=False).argmax(1).numpy()
        metrics["test"] = classification_metrics(rgb_test.labels, pred, rgb.class_names)
        save_confusion_png(metrics["test"]["confusion"], rgb.class_names, out_dir / "confusion.png",
                           f"{metrics['step']}: test OA {metrics['test']['overall_accuracy']:.3f}")
    metrics["summary"] = summary
    meta = {"backbone": dc.backbone, "class_names": rgb.class_names, "band_names": rgb.band_names,
            "mean": mean, "std": std, "patch_size": rgb.size, "role": metrics["step"],
            # RGB patches without georeference (JPEG) take the MS sensor's ground resolution
            "gsd": rgb.gsd or (ms.gsd if ms is not None else None),
            "summary": summary, "metrics": {s: {m: metrics[s][m] for m in ("overall_accuracy", "macro_f1")}
                                            for s in ("val", "test") if s in metrics}}
    save_model(out_dir, student, meta)
    write_metrics_json(out_dir / "metrics.json", metrics)
    ckpt.remove()
    best_path.unlink(missing_ok=True)
    events.metrics(metrics["step"], {**summary, **meta["metrics"]})
    return metrics
