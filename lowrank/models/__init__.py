"""Models built from the ops: encoders and task heads."""
from .classifier import SequenceClassifier

__all__ = ["SequenceClassifier"]
