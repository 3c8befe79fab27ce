"""The dock's step forms, one module per step: each turns its rows into the step's job
(steps.py holds what the Processing algorithms share) and shows the step's results."""

from .base import StepForm
from .classify import ClassifyForm
from .data import DataForm
from .distill import DistillForm
from .matcher import MatcherForm
from .teacher import TeacherForm

__all__ = ["StepForm", "DataForm", "TeacherForm", "MatcherForm", "DistillForm", "ClassifyForm"]
