"""AdamW with Adam's bias correction as an option.

The original BERT/RoBERTa fine-tuning recipe ("Standard" in Aghajanyan et al. 2021) used
Adam without bias correction; Zhang et al. (2020, "Revisiting few-sample BERT
fine-tuning") showed that turning it on stabilises fine-tuning, one of the two changes
that make Standard++. ``torch.optim.AdamW`` always corrects, so rxf uses it when the
correction is on and this small optimiser when it is off.
"""

from __future__ import annotations

import torch


class AdamWNoBiasCorrection(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter 2019) *without* bias correction:

        m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr * wd * p - lr * m / (sqrt(v) + eps)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss


def adamw(params, bias_correction: bool, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` when ``bias_correction``, else ``AdamWNoBiasCorrection``."""
    if bias_correction:
        return torch.optim.AdamW(params, **kwargs)
    return AdamWNoBiasCorrection(params, **kwargs)
