"""Cells of the Markdown tables that rxf prints and writes."""

from __future__ import annotations

import math


def percent(value: float | None) -> str:
    """A score ×100 to one decimal, as the paper's tables give it; "–" where there is no
    number: a metric the file or task lacks, or NaN (which JSON stores as null)."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}"
