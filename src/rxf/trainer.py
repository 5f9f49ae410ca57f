"""``RXFConfig`` and ``RXFTrainer``: the six methods as a drop-in Hugging Face Trainer.

    config = RXFConfig(output_dir="out", method="r3f", r3f_lambda=1.0, noise_type="uniform")
    trainer = RXFTrainer(model=model, args=config, train_dataset=..., eval_dataset=...)
    trainer.train()

R3F/R4F/SMART replace ``compute_loss``; FreeLB, which runs its own K backward calls,
replaces ``training_step``; R4F normalises the head when the trainer is built; STD and
STD++ change only the optimiser's bias correction and the training length. The task
loss is computed from the logits here (``model_accepts_loss_kwargs = False``), so the
Trainer's gradient-accumulation scaling stays right. Each method's extra terms
(``task_loss``, ``regularizer``, ``bregman``) and its counted forward/backward passes are
averaged over the logging interval and added to the Trainer's logs, so ``report_to``
shows them; ``train_seconds`` (wall clock without evaluation, carried across resumes) is
logged beside them, which gives the paper's wall-time-to-best-checkpoint (Figure 1).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback, TrainingArguments

from rxf.errors import OptionError
from rxf.methods.freelb import freelb_step
from rxf.methods.generation import check_generation_method, generation_loss
from rxf.methods.options import MethodOptions
from rxf.methods import method_loss
from rxf.methods.r4f import apply_spectral_norm, refresh_spectral_norm
from rxf.methods.smart import EMATeacher
from rxf.methods.standard import task_loss
from rxf.models import LABEL_KEYS, is_generation_model
from rxf.optim import AdamWNoBiasCorrection


@dataclass
class RXFConfig(TrainingArguments, MethodOptions):
    """``TrainingArguments`` plus every method option of ``MethodOptions`` (see its
    fields' help texts; defaults follow Aghajanyan et al. 2021 and the reference code)."""

    def __post_init__(self):
        super().__post_init__()
        self.validate()


class RXFTrainer(Trainer):
    """A ``transformers.Trainer`` whose training update is the method named by
    ``args.method`` (an ``RXFConfig``). Evaluation is the plain forward pass.

    Attributes:
        passes: ``{"forward": n, "backward": n}`` run by the last training batch, counted
            at run time by the method (SMART's teacher pass is counted separately as
            ``teacher_forward``).
        teacher: SMART's EMA teacher (``None`` for other methods or without Bregman).
    """

    def __init__(self, model=None, args: RXFConfig | None = None, **kwargs):
        if args is None:
            args = RXFConfig(output_dir="rxf_output")
        if not isinstance(args, MethodOptions):
            raise OptionError("RXFTrainer needs args=RXFConfig(...) (TrainingArguments plus the method options)")
        args.validate()
        if model is not None and is_generation_model(model):
            check_generation_method(args.method)
        if args.method == "r4f" and model is not None:
            # Before the optimiser is built, so it holds the reparameterised weights.
            apply_spectral_norm(model, args.r4f_scope)
        if not args.resolved_bias_correction() and kwargs.get("optimizer_cls_and_kwargs") is None:
            kwargs["optimizer_cls_and_kwargs"] = (
                AdamWNoBiasCorrection,
                {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            )
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.passes: dict[str, int] = {}
        self.teacher: EMATeacher | None = None
        self._method_logs: dict[str, list] = defaultdict(list)
        self._clock = _TrainClock()
        self.add_callback(self._clock)
        if args.method == "smart" and args.smart_bregman:
            self.add_callback(_TeacherUpdate(self))

    # --- the update ----------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if is_generation_model(model):
            if return_outputs or not model.training:  # evaluation: the model's own loss
                outputs = model(**inputs)
                return (outputs.loss, outputs) if return_outputs else outputs.loss
            loss, logs = generation_loss(model, inputs, self.args)
            self._record(logs)
            return loss
        if return_outputs or not model.training:
            outputs = model(**{k: v for k, v in inputs.items() if k not in LABEL_KEYS})
            loss = task_loss(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        loss, logs = method_loss(model, inputs, self.args, self._smart_teacher(model))
        self._record(logs)
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.method != "freelb":
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        accumulation = self.current_gradient_accumulation_steps
        distributed = self.accelerator.num_processes > 1
        with self.compute_loss_context_manager():
            loss, logs = freelb_step(
                model,
                inputs,
                self.args,
                backward=lambda step_loss: self.accelerator.backward(step_loss / accumulation),
                update=self.state.global_step,
                no_sync=(lambda: self.accelerator.no_sync(model)) if distributed else None,
            )
        self._record(logs)
        return loss / accumulation

    def _smart_teacher(self, model) -> EMATeacher | None:
        if self.args.method != "smart" or not self.args.smart_bregman:
            return None
        if self.teacher is None:  # lazily, once the model sits on its device
            self.teacher = EMATeacher(model, self.args)
        return self.teacher

    # --- training length (STD++) -----------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        factor = args.resolved_length_factor()
        if factor != 1.0:
            args = copy.copy(args)
            args.num_train_epochs = args.num_train_epochs * factor
            if args.max_steps > 0:
                args.max_steps = math.ceil(args.max_steps * factor)
        return super().set_initial_training_values(args, dataloader)

    # --- logging -----------------------------------------------------------------------
    def _record(self, logs: dict[str, Any]) -> None:
        self.passes = {"forward": int(logs["forward_passes"]), "backward": int(logs["backward_passes"])}
        if "teacher_forward_passes" in logs:
            self.passes["teacher_forward"] = int(logs["teacher_forward_passes"])
        for key, value in logs.items():
            # Tensors stay on the device: no host sync until the logging step.
            self._method_logs[key].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._method_logs and "loss" in logs:
            for key, values in self._method_logs.items():
                logs[key] = float(torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in values]).mean())
            self._method_logs.clear()
        if self._clock.running:
            logs["train_seconds"] = round(self._clock.seconds(), 3)
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        refresh_spectral_norm(self.model)
        with self._clock.paused():
            return super().evaluate(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        # The state dict folds W / sigma into plain weights (rxf.methods.r4f); make sigma exact first.
        refresh_spectral_norm(self.model)
        super()._save(output_dir, state_dict)


@dataclass
class RXFSeq2SeqConfig(Seq2SeqTrainingArguments, MethodOptions):
    """``Seq2SeqTrainingArguments`` (generation during evaluation) plus the method options."""

    def __post_init__(self):
        super().__post_init__()
        self.validate()


class RXFSeq2SeqTrainer(RXFTrainer, Seq2SeqTrainer):
    """``RXFTrainer`` on ``Seq2SeqTrainer``: R3F for summarisation, with evaluation by
    generation (``predict_with_generate``). Takes an ``RXFSeq2SeqConfig``."""


class _TrainClock(TrainerCallback):
    """Wall-clock training seconds without evaluation, continued across resumes from
    the ``train_seconds`` stored in the checkpoint's log history."""

    def __init__(self):
        self.running = False
        self._start = self._offset = self._paused = 0.0
        self._pause_start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._offset = max((e["train_seconds"] for e in state.log_history if "train_seconds" in e), default=0.0)
        self._start, self._paused, self.running = time.perf_counter(), 0.0, True

    def on_train_end(self, args, state, control, **kwargs):
        self.running = False

    def seconds(self) -> float:
        now = time.perf_counter()
        paused = self._paused + (now - self._pause_start if self._pause_start is not None else 0.0)
        return self._offset + now - self._start - paused

    @contextlib.contextmanager
    def paused(self):
        """Stop the clock inside the block (nested blocks count once)."""
        if self._pause_start is not None:
            yield
            return
        self._pause_start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None


class _TeacherUpdate(TrainerCallback):
    """SMART: move the EMA teacher after each optimiser step."""

    def __init__(self, trainer: RXFTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer.teacher is not None:
            self.trainer.teacher.update(self.trainer.model, state.global_step, state.max_steps)


def best_checkpoint_seconds(log_history: list[dict], best_step: int | None) -> float | None:
    """Training seconds at the evaluation of step ``best_step`` (the best checkpoint)."""
    for entry in log_history:
        if entry.get("step") == best_step and "train_seconds" in entry and any(k.startswith("eval_") for k in entry):
            return entry["train_seconds"]
    return None
