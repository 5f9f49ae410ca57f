"""What users would run instead of rxf, timed in the same rounds as rxf's own updates
(``rxf.experiments.cost.measure``): the baselines of the performance issue's targets.

- ``hf-trainer``: a plain ``transformers.Trainer`` update (``training_step``, gradient
  clipping, optimiser and scheduler step) beside ``RXFTrainer`` doing the same for STD and
  STD++: rxf's overhead over the Trainer it extends.
- ``smart-pytorch S``: ``SMARTLoss`` from the ``smart-pytorch`` package (pip install
  smart-pytorch) on the same model, S ascent steps, with its README's loss functions.
  It has no Bregman teacher: compare it with rxf's ``smartS-nobregman`` row for the same
  work, and with ``smartS`` for what rxf's SMART costs by default.
- ``fairseq-r3f``: R3F computed the way fairseq's ``sentence_prediction_r3f`` criterion
  does it: noise drawn from a ``torch.distributions`` sampler on the host and copied to
  the embeddings' device, the noised pass on a detached copy, two separate passes, and
  the loss read back to the host every update for logging.

Not peers but parts: ``forward-nograd`` runs only the noised pass of ``r3f-nograd`` (one
training-mode forward without autograd, dropout on), so that ``r3f-nograd - std`` can be
set against what that pass alone costs; ``forward-nograd-nodropout`` is the same pass in
eval mode, which shows what drawing the dropout masks costs (work FLOP counts leave out).

Every runner counts the passes it runs (a forward pre-hook on the model; backward calls as
they happen), so the table's "counted" columns are measured for peers too.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile

import torch
import torch.nn.functional as F

from rxf.methods import MethodOptions
from rxf.models import model_inputs
from rxf.noise import sample_noise


def forward_embeds(model: torch.nn.Module, embeds: torch.Tensor, batch: dict) -> torch.Tensor:
    """The peers' path: word embeddings looked up outside the model and fed back as
    ``inputs_embeds`` (as fairseq's and smart-pytorch's code does; rxf perturbs inside the
    model's forward instead)."""
    return model(inputs_embeds=embeds, **{k: v for k, v in model_inputs(batch).items() if k != "input_ids"}).logits


class _CountingRunner:
    """A model copy whose forward calls are counted; subclasses implement ``_step``."""

    def __init__(self, name: str, options: MethodOptions, model: torch.nn.Module, batch: dict):
        self.name, self.options, self.batch = name, options, batch
        self.model = copy.deepcopy(model).train()
        self.logs: dict = {}
        self._forwards = 0
        self.model.register_forward_pre_hook(self._count_forward)

    def _count_forward(self, *_):
        self._forwards += 1

    def update(self) -> None:
        self._forwards = 0
        backward = self._step()
        self.logs = {"forward_passes": self._forwards, "backward_passes": backward}

    def _step(self) -> int:
        raise NotImplementedError


class TrainerRunner(_CountingRunner):
    """One update as ``Trainer._inner_training_loop`` runs it, for a plain ``Trainer``
    (``method=None``) or an ``RXFTrainer`` with the given method."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, method: str | None, bf16: bool = False):
        super().__init__(name, MethodOptions(method=method or "std"), model, batch)
        from transformers import Trainer, TrainingArguments

        from rxf.trainer import RXFConfig, RXFTrainer

        device = batch["input_ids"].device
        common = dict(output_dir=tempfile.mkdtemp(prefix="rxf-bench-"), report_to="none", learning_rate=1e-5,
                      use_cpu=device.type == "cpu", bf16=bf16, disable_tqdm=True)
        if method is None:
            self.trainer = Trainer(model=self.model, args=TrainingArguments(**common))
        else:
            self.trainer = RXFTrainer(model=self.model, args=RXFConfig(method=method, **common))
        # What Trainer.train does before its loop: Accelerate's prepare wraps the forward in
        # the mixed-precision autocast and the optimiser in its own wrapper.
        trainer = self.trainer
        trainer.create_optimizer()
        trainer.model_wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.create_scheduler(num_training_steps=10_000, optimizer=trainer.optimizer)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by training_step

    def _step(self) -> int:
        trainer = self.trainer
        trainer.training_step(trainer.model_wrapped, self.batch)
        trainer.accelerator.clip_grad_norm_(trainer.model_wrapped.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        return getattr(trainer, "passes", {}).get("backward", 1)


class SmartPytorchRunner(_CountingRunner):
    """``smart_pytorch.SMARTLoss`` as its README uses it: clean logits, task loss, plus
    lambda_s times the SMART loss of the word embeddings."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, options: MethodOptions, autocast):
        super().__init__(name, options, model, batch)
        from smart_pytorch import SMARTLoss, kl_loss, sym_kl_loss

        self.autocast = autocast
        self.smart = SMARTLoss(
            eval_fn=lambda embeds: forward_embeds(self.model, embeds, batch),
            loss_fn=kl_loss, loss_last_fn=sym_kl_loss, num_steps=options.smart_steps,
            step_size=options.smart_step_size, noise_var=options.smart_noise_var,
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def _step(self) -> int:
        with self.autocast:
            embeds = self.model.get_input_embeddings()(self.batch["input_ids"])
            logits = forward_embeds(self.model, embeds, self.batch)
            loss = F.cross_entropy(logits, self.batch["labels"]) + self.options.smart_lambda * self.smart(embeds, logits)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.options.smart_steps + 1  # S calls of torch.autograd.grad, then this backward


class FairseqR3FRunner(_CountingRunner):
    """R3F the way fairseq's criterion computes it (see the module docstring)."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, options: MethodOptions, autocast):
        super().__init__(name, options, model, batch)
        self.autocast = autocast
        eps = options.noise_eps
        self.sampler = (torch.distributions.Normal(0.0, eps) if options.resolved_noise_type() == "normal"
                        else torch.distributions.Uniform(-eps, eps))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.logged = 0.0

    def _step(self) -> int:
        labels = self.batch["labels"]
        with self.autocast:
            embeds = self.model.get_input_embeddings()(self.batch["input_ids"])
            logits = forward_embeds(self.model, embeds, self.batch)
            noise = self.sampler.sample(embeds.shape).to(embeds)  # drawn on the host, then copied
            noised_logits = forward_embeds(self.model, embeds.detach().clone() + noise, self.batch)
            symm_kl = (
                F.kl_div(F.log_softmax(noised_logits, -1, dtype=torch.float32), F.softmax(logits, -1, dtype=torch.float32),
                         reduction="sum")
                + F.kl_div(F.log_softmax(logits, -1, dtype=torch.float32),
                           F.softmax(noised_logits, -1, dtype=torch.float32), reduction="sum")
            ) * labels.numel()
            loss = F.cross_entropy(logits, labels, reduction="sum") + self.options.r3f_lambda * symm_kl
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.logged = loss.item()  # fairseq's logging output: a host sync every update
        return 1


class NoGradForwardRunner(_CountingRunner):
    """The gradient-free noised pass of R3F's fixed-target variant, alone: noise on the
    looked-up embeddings and one training-mode forward under ``torch.no_grad``; with
    ``dropout=False`` the same pass in eval mode."""

    paper_passes = (1, 0)

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, options: MethodOptions, autocast,
                 dropout: bool = True):
        super().__init__(name, options, model, batch)
        self.autocast = autocast
        self.model.train(dropout)

    def _step(self) -> int:
        with torch.no_grad(), self.autocast:
            embeds = self.model.get_input_embeddings()(self.batch["input_ids"])
            forward_embeds(self.model, embeds + sample_noise(embeds, self.options.resolved_noise_type(), self.options.noise_eps),
                           self.batch)
        return 0


def rxf_rows_for_peers(base: MethodOptions, smart_steps: tuple[int, ...]) -> dict[str, MethodOptions]:
    """rxf's SMART without its Bregman teacher: the same work as ``smart-pytorch``."""
    return {f"smart{s}-nobregman": dataclasses.replace(base, method="smart", smart_steps=s, smart_bregman=False)
            for s in smart_steps}


def peer_runners(model: torch.nn.Module, batch: dict, base: MethodOptions, smart_steps: tuple[int, ...],
                 bf16: bool, device: str, keep=lambda name: True) -> list:
    """The peers whose names ``keep`` accepts, ready to time (each holds its own model
    copy, so large models may need fewer at once); ``smart-pytorch`` rows only where the
    package is installed."""
    def autocast():
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    makers = {
        "hf-trainer": lambda: TrainerRunner("hf-trainer", model, batch, None, bf16),
        "rxf-trainer-std": lambda: TrainerRunner("rxf-trainer-std", model, batch, "std", bf16),
        "rxf-trainer-std++": lambda: TrainerRunner("rxf-trainer-std++", model, batch, "std++", bf16),
        "fairseq-r3f": lambda: FairseqR3FRunner("fairseq-r3f", model, batch, dataclasses.replace(base, method="r3f"),
                                                autocast()),
        "forward-nograd": lambda: NoGradForwardRunner("forward-nograd", model, batch,
                                                      dataclasses.replace(base, method="r3f"), autocast()),
        "forward-nograd-nodropout": lambda: NoGradForwardRunner("forward-nograd-nodropout", model, batch,
                                                                dataclasses.replace(base, method="r3f"), autocast(),
                                                                dropout=False),
    }
    try:
        import smart_pytorch  # noqa: F401
    except ImportError:
        print("# smart-pytorch not installed (pip install smart-pytorch): its rows are left out")
    else:
        for s in smart_steps:
            options = dataclasses.replace(base, method="smart", smart_steps=s, smart_bregman=False)
            makers[f"smart-pytorch{s}"] = (
                lambda name=f"smart-pytorch{s}", options=options: SmartPytorchRunner(name, model, batch, options, autocast())
            )
    return [make() for name, make in makers.items() if keep(name)]
