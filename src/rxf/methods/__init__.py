"""The six fine-tuning methods, one file each. See docs/methods.md."""

from rxf.methods.freelb import freelb_step
from rxf.methods.options import METHODS, MethodOptions
from rxf.methods.r3f import r3f_loss
from rxf.methods.r4f import apply_spectral_norm, normalised_linears
from rxf.methods.smart import EMATeacher, smart_loss
from rxf.methods.standard import standard_loss, task_loss

__all__ = [
    "METHODS",
    "MethodOptions",
    "EMATeacher",
    "apply_spectral_norm",
    "freelb_step",
    "normalised_linears",
    "r3f_loss",
    "smart_loss",
    "standard_loss",
    "task_loss",
]
