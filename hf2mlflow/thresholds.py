"""The one comparison of a figure with its threshold, for evaluate's gate, convert_onnx's quality floors and the
sweep's bound: a figure that is missing, NaN or infinite is never within (it was not measured, so it cannot
pass)."""

from __future__ import annotations

import math
import numbers
from typing import Optional


def finite(value) -> bool:
    """A real number that is neither NaN nor infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def not_measured(value) -> Optional[str]:
    """Why a figure does not count as measured ("missing", "not finite: nan"), or None when it does."""
    if value is None:
        return "missing"
    return None if finite(value) else f"not finite: {value}"


def within(value, threshold: float, greater_is_better: bool, tolerance: float = 0.0) -> bool:
    """Whether `value` keeps to `threshold` (at least it when greater is better, else at most it, `tolerance`
    allowed for float rounding); False for a figure that is missing or not finite."""
    if not finite(value):
        return False
    return value >= threshold - tolerance if greater_is_better else value <= threshold + tolerance
