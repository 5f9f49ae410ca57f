"""rxf: robust fine-tuning of pre-trained transformers.

Implements R3F and R4F (Aghajanyan et al., "Better Fine-Tuning by Reducing
Representational Collapse", ICLR 2021, arXiv 2008.03156) and the baselines they are
compared with: Standard, Standard++, SMART and FreeLB, for any Hugging Face model.
"""

from rxf.divergence import symmetric_kl, symmetric_squared_error
from rxf.methods import (
    METHODS,
    EMATeacher,
    MethodOptions,
    apply_spectral_norm,
    freelb_step,
    build_method,
    r3f_loss,
    smart_loss,
    standard_loss,
    task_loss,
)
from rxf.trainer import RXFConfig, RXFTrainer

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "EMATeacher",
    "MethodOptions",
    "RXFConfig",
    "RXFTrainer",
    "apply_spectral_norm",
    "freelb_step",
    "build_method",
    "r3f_loss",
    "smart_loss",
    "standard_loss",
    "symmetric_kl",
    "symmetric_squared_error",
    "task_loss",
]
