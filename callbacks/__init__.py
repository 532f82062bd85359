"""Lightning callbacks that run during training."""

from callbacks.label_leakage import LabelLeakageCallback

__all__ = ["LabelLeakageCallback"]
