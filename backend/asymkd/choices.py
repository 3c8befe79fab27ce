"""Named choices of the engine, one table per kind (name -> what it means).

Config validation, the CLI's argparse `choices` and the trainers read these tables; the
implementations register against the same names (a test checks they agree). Kept free of
torch so that parsing a command line stays fast.
"""

from __future__ import annotations

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
# `--device` / `device`; "cuda:N" stands for any CUDA device number
DEVICES = {"auto": "CUDA when available, else the CPU", "cpu": "the CPU",
           "cuda": "the first CUDA GPU (bfloat16 autocast)", "cuda:N": "CUDA GPU number N, e.g. cuda:1"}
# `classify --device`: onnxruntime takes no device number
ONNX_DEVICES = tuple(d for d in DEVICES if d != "cuda:N")

# `classify --uncertain-by`: what --uncertain-below T compares (classify/stats.py)
UNCERTAINTY_MEASURES = {"confidence": "the best class's probability below T",
                        "margin": "best minus second probability below T",
                        "entropy": "normalised entropy above 1 - T (1 - entropy below T)"}

# config key -> its table
CONFIG_CHOICES = {"distill.domain_loss": DOMAIN_LOSSES, "pairing.method": PAIRING_METHODS,
                  "distill.pseudo": PSEUDO_MODES, "distill.semi_supervised": SEMI_SUPERVISED,
                  "matcher.positives": POSITIVES}


def check(key: str, value: str, table: dict[str, str] | None = None) -> str:
    """`value` if it names a choice of `key` (a config key, or an option of `table`), else a
    ConfigError listing the valid names."""
    from .errors import ConfigError
    table = CONFIG_CHOICES[key] if table is None else table
    if value not in table:
        raise ConfigError(f"{key} must be one of {', '.join(table)}, not {value!r}",
                          "; ".join(f"{name}: {about}" for name, about in table.items()))
    return value
