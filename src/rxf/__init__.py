"""rxf: robust fine-tuning of pre-trained transformers.

Implements R3F and R4F (Aghajanyan et al., "Better Fine-Tuning by Reducing
Representational Collapse", ICLR 2021, arXiv 2008.03156) and the baselines they are
compared with: Standard, Standard++, SMART and FreeLB, for any Hugging Face model.

Names are imported on first use (PEP 562): ``import rxf`` costs nothing until a name is
used, so the ``rxf`` command answers ``--help`` without importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "symmetric_kl": "rxf.divergence", "symmetric_squared_error": "rxf.divergence",
    "RXFConfig": "rxf.trainer", "RXFTrainer": "rxf.trainer",
    **{name: "rxf.methods" for name in (
        "METHODS", "EMATeacher", "Method", "MethodOptions", "apply_spectral_norm", "build_method", "freelb_step",
        "generation_loss", "r3f_loss", "smart_loss", "standard_loss", "task_loss",
    )},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rxf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
