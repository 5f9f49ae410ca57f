"""Strict JSON, written atomically: the one writer of every rxf result file.

``results.json`` and the reports are read by other tools, and Python's ``json`` writes a
bare ``NaN`` (not JSON) for a non-finite float: every non-finite number is written as
``null`` instead. The file is written beside its destination and renamed over it, so a
reader (or a rerun after a kill) never sees half of it. A report made of several files is
written the same way, as a folder built beside its destination (``replace_folder_whole``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable


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


def replace_folder_whole(out: Path, allowed: set[str], write: Callable[[Path], None], what: str) -> None:
    """Have ``write(folder)`` fill a folder built beside ``out``, then put it in ``out``'s place,
    so ``out`` holds the old report or the new one, never half of either. ``out`` may exist
    only as a folder of ``allowed`` file names (an earlier ``what``): anything else in it
    would be deleted, so it is refused (``--output-dir`` named in the error)."""
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= allowed):
        raise SystemExit(f"--output-dir: {out} exists and holds more than {what}; choose another folder")
    building = out.parent / f".{out.name}.building{os.getpid()}"
    try:
        write(building)
        if out.exists():
            shutil.rmtree(out)
        os.replace(building, out)
    except OSError as exc:
        raise SystemExit(f"--output-dir: cannot write {out} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
