"""Strict JSON, written atomically: the one writer of every rxf result file.

``results.json`` and the reports are read by other tools, and Python's ``json`` writes a
bare ``NaN`` (not JSON) for a non-finite float: every non-finite number is written as
``null`` instead. The file is written beside its destination and renamed over it, so a
reader (or a rerun after a kill) never sees half of it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def finite_or_none(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, +-inf) replaced by ``None``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON to ``path`` (a temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(finite_or_none(data), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)
