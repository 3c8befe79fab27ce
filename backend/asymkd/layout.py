"""The names of a run folder's parts, written once for the engine.

The QGIS plugin keeps the same names in `asymkd_qgis/layout.py` (it never imports the
engine); a test checks that both copies agree. Change a name here and there together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# files at the top of a run folder
CONFIG = "config.yaml"
EVENTS = "events.jsonl"
REPORT = "report.html"
STUDENT_ONNX = "student.onnx"
CLASSIFIED = "classified"  # classified layers of the run's data
LOCK = ".lock"  # held by the one command writing into the run folder (runlock.py)

# one folder per step
TEACHER = "teacher"
MATCHER = "matcher"
PAIRS = "pairs"
STUDENT = "student"
BASELINE = "baseline"
STEP_FOLDERS = (TEACHER, MATCHER, PAIRS, BASELINE, STUDENT)
# the command that writes each step folder: a missing or damaged file there is made again by it
WRITTEN_BY = {TEACHER: "teacher", MATCHER: "matcher", PAIRS: "pair", BASELINE: "distill", STUDENT: "distill"}

# files inside a step or model folder
METRICS = "metrics.json"
META = "meta.json"
WEIGHTS = "model.safetensors"
PAIRS_FILE = "pairs.npz"
CONFUSION = "confusion.png"
CHECKPOINT = "checkpoint.pt"  # while a step trains; removed once it has finished
EVAL = "eval"  # `asymkd evaluate` results inside a model folder, one folder per data set
# the teacher's folder: its out-of-fold soft labels and the MS samples they belong to
SOFT_LABELS = "soft_labels.npy"
MS_INDEX = "ms_index.json"
FOLDS = "folds.npz"
# a folder of chips cut from a map (`asymkd chips`)
CHIPS_MANIFEST = "chips.json"


def remake_hint(folder: str | Path) -> str:
    """What makes a file of `folder` (a step folder of a run) again: the step that writes it."""
    folder = Path(folder)
    command = WRITTEN_BY.get(folder.name)
    if command is None:
        return "run the step that wrote it again (or restore the file)"
    return f"run `asymkd {command} --run {folder.parent}` again: it writes this file"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run: `RunFolder(run_dir).teacher`, `.metrics(STUDENT)`, ..."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def step(self, name: str) -> Path:
        return self.root / name

    def metrics(self, step: str) -> Path:
        """A step's metrics.json: it exists once the step has finished."""
        return self.root / step / METRICS

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    @property
    def report(self) -> Path:
        return self.root / REPORT

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
    def student_onnx(self) -> Path:
        return self.root / STUDENT_ONNX
