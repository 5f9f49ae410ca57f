"""AdamW with Adam's bias correction as an option.

The original BERT/RoBERTa fine-tuning recipe ("Standard" in Aghajanyan et al. 2021) used
Adam without bias correction; Zhang et al. (2020, "Revisiting few-sample BERT
fine-tuning") showed that turning it on stabilises fine-tuning, one of the two changes
that make Standard++. ``torch.optim.AdamW`` always corrects, so rxf uses it when the
correction is on and ``AdamWNoBiasCorrection`` when it is off.
"""

from __future__ import annotations

import torch

# Adam divides by the bias corrections 1 - beta^t. From this step count on, beta^t is 0 in
# float32 and float64 for every beta < 1 (0.999^(2^30) = e^-1073741), so the corrections
# are exactly 1. Adding 1 per step keeps t there: float32 cannot even represent 2^30 + 1.
_UNCORRECTED_STEP = float(2**30)


class AdamWNoBiasCorrection(torch.optim.AdamW):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter 2019) *without* bias correction:

        p <- p - lr * wd * p;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr * m / (sqrt(v) + eps)

    ``torch.optim.AdamW`` with every parameter's step count started at 2^30, where the
    corrections are exactly 1, so that it keeps PyTorch's single-tensor, multi-tensor and
    fused kernels. Unset ``fused``: fused for CUDA parameters; ``RXFTrainer`` passes the
    choice the Trainer makes for its own AdamW (``optim="adamw_torch_fused"``: fused on
    CPUs too, where it is ~5x faster than the single-tensor loop). ``state["step"]``
    therefore does not count updates. Needs beta < 1.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 fused: bool | None = None, **kwargs):
        params = list(params)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamWNoBiasCorrection needs betas in [0, 1), got {betas}")
        if fused is None:
            tensors = [p for p in params if isinstance(p, torch.Tensor)] or [
                p for group in params if isinstance(group, dict) for p in group["params"]]
            fused = bool(tensors) and all(p.is_cuda and p.is_floating_point() for p in tensors)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None, **kwargs)
        self._all_started = False

    @torch.no_grad()
    def step(self, closure=None):
        if not self._all_started:
            self._all_started = self._start_counts()
        return super().step(closure)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._all_started = False  # a state saved without step counts is started at the next step

    def _start_counts(self) -> bool:
        """Give every parameter with a gradient and no step count its count, where the
        corrections vanish (AdamW then creates nothing else anew); True when no parameter
        is left without one, so that later steps skip this loop."""
        complete = True
        for group in self.param_groups:
            on_device = group["fused"] or group["capturable"]
            for p in group["params"]:
                state = self.state[p]
                if "step" in state:
                    continue
                if p.grad is None:
                    complete = False
                    continue
                state["step"] = torch.tensor(_UNCORRECTED_STEP, dtype=torch.float32,
                                             device=p.device if on_device else "cpu")
                state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
                if group["amsgrad"]:
                    state.setdefault("max_exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        return complete


def adamw(params, bias_correction: bool, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` when ``bias_correction``, else ``AdamWNoBiasCorrection``."""
    if bias_correction:
        return torch.optim.AdamW(params, **kwargs)
    return AdamWNoBiasCorrection(params, **kwargs)
