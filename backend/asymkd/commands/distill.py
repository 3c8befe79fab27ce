from __future__ import annotations

from ..choices import DOMAIN_LOSSES, PSEUDO_MODES, SEMI_SUPERVISED
from ..layout import RunFolder
from ..pipeline import step_distill
from ._options import add_data_options, add_run_options, run_step

FLAGS = {"backbone": "distill.backbone", "epochs": "distill.epochs", "batch_size": "distill.batch_size",
         "lr": "distill.lr", "repair_every": "distill.repair_every", "w_feat": "distill.w_feat",
         "w_pseudo": "distill.w_pseudo", "w_gt": "distill.w_gt", "pseudo": "distill.pseudo",
         "temperature": "distill.temperature", "domain_loss": "distill.domain_loss",
         "baseline": "distill.baseline", "input_size": "distill.input_size",
         "semi_supervised": "distill.semi_supervised", "pretrained": "distill.pretrained",
         "all_teacher_classes": "distill.all_teacher_classes"}


def add_arguments(p) -> None:
    add_run_options(p)
    add_data_options(p, "ms", "bands", "rgb", "rgb_unlabeled", "rgb_test")
    p.add_argument("--backbone", help="student backbone: efficientnet_lite0 (default, bundled ImageNet "
                   "weights), resnet18_w32 (from scratch) or a timm model name")
    p.add_argument("--input-size", type=int, metavar="PX",
                   help="resize patches to PX inside the model (0 = as they are)")
    p.add_argument("--semi-supervised", choices=list(SEMI_SUPERVISED),
                   help="how unlabeled RGB is used: " + "; ".join(f"{k}: {v}" for k, v in SEMI_SUPERVISED.items()))
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start the backbone from random weights instead of ImageNet")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--repair-every", type=int, metavar="K", help="re-pair every K steps (0 = every epoch)")
    p.add_argument("--w-feat", type=float, help="weight of the domain-shift (CORAL/MMD) term")
    p.add_argument("--w-pseudo", type=float, help="weight of the teacher pseudo-label term")
    p.add_argument("--w-gt", type=float, help="weight of the ground-truth term")
    p.add_argument("--pseudo", choices=list(PSEUDO_MODES), help="pseudo-label term: KL at temperature or hard CE")
    p.add_argument("--temperature", type=float)
    p.add_argument("--domain-loss", choices=list(DOMAIN_LOSSES),
                   help="; ".join(f"{k}: {v}" for k, v in DOMAIN_LOSSES.items()))
    p.add_argument("--baseline", action="store_true", default=None,
                   help="also train the same student without distillation (default on)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--all-teacher-classes", action="store_true", default=None,
                   help="the student learns every class of the teacher, not only those of its RGB labels")


def run(args, events) -> int:
    results = run_step(args, events, FLAGS, step_distill)
    if results is None:  # a rank other than 0 under torchrun
        return 0
    for name, m in results.items():
        part = m.get("test") or m.get("val")
        which = "test" if "test" in m else "validation"
        print(f"{name}: {which} OA {part['overall_accuracy']:.4f}, macro-F1 {part['macro_f1']:.4f}")
    print(f"report: {RunFolder(args.run).report}")
    return 0
