"""Accuracy, the Performance-Parameter Trade-off, and small aggregation helpers."""

from __future__ import annotations

import math

PPT_C = 1e7


def ppt(accuracy: float, trainable_params: float) -> float:
    """V-PEFT Bench's PPT = M * exp(-log10(P / 1e7 + 1)).

    ``accuracy`` is a fraction in [0, 1]; ``trainable_params`` excludes the head.
    A NaN accuracy (diverged run) gives NaN.
    """
    if not 0.0 <= accuracy <= 1.0 and not math.isnan(accuracy):
        raise ValueError(f"accuracy must be a fraction in [0, 1], got {accuracy}")
    if trainable_params < 0:
        raise ValueError(f"trainable_params must be >= 0, got {trainable_params}")
    return accuracy * math.exp(-math.log10(trainable_params / PPT_C + 1.0))
