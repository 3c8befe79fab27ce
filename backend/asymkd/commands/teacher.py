from __future__ import annotations

from ..pipeline import step_teacher
from ._options import add_data_options, add_run_options, run_step

FLAGS = {"backbone": "teacher.backbone", "epochs": "teacher.epochs", "batch_size": "teacher.batch_size",
         "lr": "teacher.lr", "folds": "teacher.folds", "weights": "teacher.weights",
         "input_size": "teacher.input_size", "pretrained": "teacher.pretrained"}


def add_arguments(p) -> None:
    add_run_options(p)
    add_data_options(p, "ms", "bands")
    p.add_argument("--backbone", help="efficientnet_lite0 (default, bundled ImageNet weights), "
                   "resnet18_w32 (from scratch) or a timm model name")
    p.add_argument("--input-size", type=int, metavar="PX",
                   help="resize patches to PX inside the model (0 = as they are)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start the backbone from random weights instead of ImageNet")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--folds", type=int, help="out-of-fold teachers for soft labels (0 = none)")
    p.add_argument("--weights", help="local backbone weights file to start from")


def run(args, events) -> int:
    metrics = run_step(args, events, FLAGS, step_teacher)
    if metrics is None:  # a rank other than 0 under torchrun
        return 0
    acc = metrics["summary"].get("out_of_fold_accuracy")
    print(f"teacher written to {args.run}/teacher" + (f" (out-of-fold accuracy {acc:.3f})" if acc is not None else ""))
    return 0
