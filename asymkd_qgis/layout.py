"""The names of a run folder's parts, as the plugin knows them.

The engine writes the step folders and files (`backend/asymkd/layout.py` holds the same names;
the plugin never imports the engine, and a test checks that both copies agree). The plugin
adds its own part, RUN/data/: the chips it cuts from map layers and the layers it exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# -- the engine's names (the same as backend/asymkd/layout.py) --------------------------
CONFIG = "config.yaml"
EVENTS = "events.jsonl"
REPORT = "report.html"
STUDENT_ONNX = "student.onnx"
CLASSIFIED = "classified"
LOCK = ".lock"

TEACHER = "teacher"
MATCHER = "matcher"
PAIRS = "pairs"
STUDENT = "student"
BASELINE = "baseline"
STEP_FOLDERS = (TEACHER, MATCHER, PAIRS, BASELINE, STUDENT)

METRICS = "metrics.json"
META = "meta.json"
WEIGHTS = "model.safetensors"
PAIRS_FILE = "pairs.npz"
CONFUSION = "confusion.png"
CHECKPOINT = "checkpoint.pt"
EVAL = "eval"
SOFT_LABELS = "soft_labels.npy"
MS_INDEX = "ms_index.json"
FOLDS = "folds.npz"
CHIPS_MANIFEST = "chips.json"

# -- the plugin's own part ----------------------------------------------------------------
DATA = "data"
MS_CHIPS, RGB_PAIRED_CHIPS, RGB_CHIPS, RGB_TEST_CHIPS = "ms", "rgb_paired", "rgb", "rgb_test"
EXPORTS = "exports"


@dataclass
class RunLayout:
    """Paths of one run folder."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def metrics(self, step: str) -> Path:
        return self.root / step / METRICS

    @property
    def data(self) -> Path:
        return self.root / DATA

    @property
    def ms(self) -> Path:
        return self.data / MS_CHIPS

    @property
    def rgb_paired(self) -> Path:
        return self.data / RGB_PAIRED_CHIPS

    @property
    def rgb(self) -> Path:
        return self.data / RGB_CHIPS

    @property
    def rgb_test(self) -> Path:
        return self.data / RGB_TEST_CHIPS

    @property
    def exports(self) -> Path:
        """Layers that are not local files, written out for the engine."""
        return self.data / EXPORTS

    @property
    def teacher(self) -> Path:
        return self.root / TEACHER

    @property
    def matcher(self) -> Path:
        return self.root / MATCHER

    @property
    def pairs(self) -> Path:
        return self.root / PAIRS

    @property
    def pairs_file(self) -> Path:
        return self.root / PAIRS / PAIRS_FILE

    @property
    def student(self) -> Path:
        return self.root / STUDENT

    @property
    def baseline(self) -> Path:
        return self.root / BASELINE

    @property
    def student_weights(self) -> Path:
        return self.student / WEIGHTS

    @property
    def student_onnx(self) -> Path:
        return self.root / STUDENT_ONNX

    @property
    def confusion(self) -> Path:
        return self.student / CONFUSION

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def classified(self) -> Path:
        return self.root / CLASSIFIED
