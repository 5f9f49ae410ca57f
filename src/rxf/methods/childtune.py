"""Child-Tuning (Xu et al., EMNLP 2021, arXiv 2109.05687): update only a child network.

Child-Tuning-D (``childtune_mode="d"``, the task-driven variant): before training, the
Fisher information of every parameter element w on the task data,

    F(w) = 1/N * sum over N training batches of (dL/dw)^2,

with L the task's log-likelihood loss (cross entropy; squared error for regression; token
cross entropy without label smoothing for generation). The child network is the top
fraction p (``childtune_reserve``, 0.3) of the elements by F, ranked across all tensors
together (ties at the threshold kept); during training the gradients of the others are
zeroed (M = 1[F >= threshold], g <- g * M, no rescaling), for every backward call. The
scope is the Transformer layers' parameters (``rxf.methods.hype.transformer_layers``),
as the official code's ``'layer' in name`` selects BERT's encoder layers: embeddings and
the task head always train in full.

Child-Tuning-F (``"f"``, task-free): every trainable parameter's gradient is multiplied by
a fresh Bernoulli(p) mask / p each update (the same mask for all micro-batches and
backward calls of one update; redrawn after each optimiser step).

Where rxf differs from the official code (alibaba/AliceMind, ChildTuning): (1) F is built
from batch gradients, as the code does (the paper's per-example Fisher would cost one
backward per example); the code also clips each tensor's batch gradient to norm
max_grad_norm before squaring it, which changes the ranking across tensors — rxf does
not unless ``childtune_fisher_clip`` is set; (2) the code masks inside its optimiser,
after the Trainer clipped the full gradient's norm; rxf masks in gradient hooks, before
clipping, so the clipped norm is that of the child network's gradient; (3) rxf's Fisher
pass leaves the random number generators as it found them (the official one draws its
own shuffled pass), so a resumed run, which loads the mask instead of recomputing it, sees
the same random numbers as the unbroken one.

Data: the Fisher needs training batches, which a ``Method`` does not otherwise see before
training. ``prepare(model, batches)`` computes it (at most ``childtune_fisher_batches``
batches; 0 = all of them); RXFTrainer (or a plain loop) calls it once before the first
update. A run that never calls it falls back, with a warning, to the first training batch
the loss sees. The mask is the method's checkpoint state (``childtune.<parameter>``), so a
resumed run keeps its child network; ``prepare`` does nothing once a mask exists.
Under DDP the Fisher sums are all-reduced before ranking, so every process keeps the same
child network. Cost: one forward and one backward per Fisher batch, once; a multiply per
gradient element per backward.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import nn

from rxf.errors import OptionError
from rxf.methods.composite import Modifier
from rxf.methods.generation import _shifted, label_smoothed_nll
from rxf.methods.hype import transformer_layers
from rxf.methods.standard import task_loss
from rxf.models import (
    extra_pass_model, is_generation_model, is_seq2seq, is_shard, logits_of, unwrap, with_decoder_inputs,
)


def likelihood_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The task's negative log-likelihood on a batch (mean), the loss whose gradients
    make the Fisher information."""
    if not is_generation_model(model):
        return task_loss(logits_of(model, batch), batch["labels"])
    if is_seq2seq(model):
        batch = with_decoder_inputs(model, batch)
        return label_smoothed_nll(logits_of(model, batch), batch["labels"], 0.0)
    return label_smoothed_nll(*_shifted(logits_of(model, batch), batch["labels"]), 0.0)


def layer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Child-Tuning-D's scope: the trainable parameters of the Transformer layers, by name."""
    inside = {id(p) for _, layer in transformer_layers(model) for p in layer.parameters()}
    return {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad and id(p) in inside}


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def fisher_information(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[dict[str, Any]],
    max_batches: int = 0,
    clip: float = 0.0,
) -> tuple[dict[str, torch.Tensor], int]:
    """F = mean over batches of the squared batch gradient, float32, per element of each
    parameter in ``params``; ``(F, batches used)``. The model runs in training mode
    (dropout on, as the official code does); the random number generators are restored
    afterwards and no ``.grad`` is touched. Under DDP the sums are all-reduced."""
    inner = extra_pass_model(model)  # no DDP synchronisation for the gradient-only passes
    names, tensors = list(params), list(params.values())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    device = tensors[0].device
    was_training, used = inner.training, 0
    inner.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in batches:
            if max_batches and used >= max_batches:
                break
            loss = likelihood_loss(inner, _on_device(batch, device))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is None:
                    continue
                grad = grad.float()
                if clip > 0:  # the official code's per-tensor clip_grad_norm_
                    grad = grad * (clip / (grad.norm() + 1e-6)).clamp(max=1.0)
                fisher[name] += grad.pow(2)
            used += 1
    inner.train(was_training)
    if used == 0:
        raise OptionError("childtune: no training batch to estimate the Fisher information from")
    count = torch.tensor(float(used), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for value in fisher.values():
            torch.distributed.all_reduce(value)
        torch.distributed.all_reduce(count)
    return {name: value / count for name, value in fisher.items()}, used


def top_fraction_mask(fisher: dict[str, torch.Tensor], reserve: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the elements with F >= the k-th largest F over all tensors,
    k = round(reserve * elements) (at least 1)."""
    flat = torch.cat([value.flatten() for value in fisher.values()])
    keep = max(1, round(reserve * flat.numel()))
    threshold = flat.kthvalue(flat.numel() - keep + 1).values
    return {name: value >= threshold for name, value in fisher.items()}


class ChildTuning(Modifier):
    """Child-Tuning's life cycle: gradient hooks in set-up, the Fisher mask in ``prepare``
    (D) or a Bernoulli mask per update (F), the D mask in every checkpoint."""

    name = "childtune"

    def __init__(self, options):
        super().__init__(options)
        self.mask: dict[str, torch.Tensor] | None = None  # D: the child network
        self.fisher_batches = 0
        self._params: dict[str, nn.Parameter] | None = None
        self._update = 0  # F: updates done, to redraw the mask once per update
        self._drawn: dict[str, tuple[int, torch.Tensor]] = {}
        self._warned = False

    @property
    def mode(self) -> str:
        return self.options.childtune_mode

    def setup(self, model):
        if self._params is not None:
            return  # hooks already in place
        if self.mode == "d":
            self._params = layer_parameters(model)
        else:
            self._params = {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
        if any(is_shard(p) for p in self._params.values()):
            raise OptionError("childtune: the model is sharded (FSDP); Child-Tuning supports one device and DDP")
        for name, param in self._params.items():
            param.register_hook(self._hook(name))

    def _hook(self, name: str):
        reserve = self.options.childtune_reserve

        def masked(grad: torch.Tensor) -> torch.Tensor:
            if self.mode == "d":
                if self.mask is None:  # before the Fisher pass (and during it)
                    return grad
                return grad.masked_fill(~self.mask[name], 0.0)
            drawn = self._drawn.get(name)
            if drawn is None or drawn[0] != self._update:
                keep = torch.empty(grad.shape, device=grad.device, dtype=torch.float32).bernoulli_(reserve)
                drawn = self._drawn[name] = (self._update, keep.bool())
            return grad.masked_fill(~drawn[1], 0.0) / reserve

        return masked

    def prepare(self, model, batches):
        if self.mode != "d" or self.mask is not None:
            return
        if self._params is None:
            self.setup(model)
        o = self.options
        fisher, self.fisher_batches = fisher_information(
            model, self._params, batches, o.childtune_fisher_batches, o.childtune_fisher_clip
        )
        self.mask = top_fraction_mask(fisher, o.childtune_reserve)

    def around(self, model, batch):
        if model.training and self.mode == "d" and self.mask is None:
            if not self._warned:
                warnings.warn(
                    "rxf childtune: no Fisher information was computed before training (prepare(model, batches)); "
                    "estimating it from the first training batch only", stacklevel=3,
                )
                self._warned = True
            self.prepare(model, [batch])
        return super().around(model, batch)

    def after_step(self, model, step, total_steps):
        self._update += 1

    def state_dict(self, model):
        if self.mask is None:
            return {}
        return {f"childtune.{name}": mask.detach().clone() for name, mask in self.mask.items()}

    def load_state_dict(self, model, state):
        saved = {k[len("childtune."):]: v for k, v in state.items() if k.startswith("childtune.")}
        if not saved:
            return
        if self._params is None:
            self.setup(model)
        missing = set(self._params) - set(saved)
        if missing:
            raise OptionError(f"childtune: the checkpoint's mask lacks {sorted(missing)[:3]}")
        self.mask = {name: saved[name].to(p.device).bool() for name, p in self._params.items()}
