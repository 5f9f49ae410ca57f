"""``RXFConfig`` and ``RXFTrainer``: the six methods as a drop-in Hugging Face Trainer.

    config = RXFConfig(output_dir="out", method="r3f", r3f_lambda=1.0, noise_type="uniform")
    trainer = RXFTrainer(model=model, args=config, train_dataset=..., eval_dataset=...)
    trainer.train()

The trainer drives the method's life cycle (``rxf.methods.base.Method``): ``setup`` when
the trainer is built (R4F normalises the head before the optimiser exists), the method's
``loss`` in ``compute_loss`` (or its own ``step`` in ``training_step`` for FreeLB, which
runs K backward calls), ``after_step`` after every optimiser step (SMART's teacher),
``before_eval`` before evaluating and saving, and the method's state in every checkpoint
(R4F's raw weights and power-iteration vectors, SMART's teacher), restored on resume and
when the best checkpoint is loaded, so that a resumed run ends where the unbroken one does.
STD and STD++ change only the optimiser's bias correction and the training length. The
classification loss is computed from the logits here, a mean per micro-batch, which the
Trainer divides by the accumulation steps; the generation loss is normalised by the
target tokens of the whole accumulated batch (``num_items_in_batch``).

Non-finite updates: an update whose loss or gradient is not finite is skipped (its
gradients are dropped before the optimiser step, so neither the weights nor the
optimiser's moments move) and counted as ``skipped_updates``; ``max_nonfinite_updates``
consecutive skips stop the run with ``TrainingDiverged``. An evaluation with a non-finite
metric, or of a model with non-finite weights, is never chosen as the best checkpoint.

Each method's extra terms (``task_loss``, ``regularizer``, ``bregman``) and its counted
forward/backward passes are averaged over the logging interval and added to the
Trainer's logs, so ``report_to`` shows them; ``train_seconds`` (wall clock without
evaluation, carried across resumes) is logged beside them, which gives the paper's
wall-time-to-best-checkpoint (Figure 1).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

from rxf.errors import OptionError, TrainingDiverged
from rxf.methods import build_method
from rxf.methods.generation import Generation
from rxf.methods.options import MethodOptions
from rxf.methods.standard import task_loss
from rxf.models import is_generation_model, model_inputs, whole
from rxf.optim import AdamWNoBiasCorrection

# The method's checkpoint state, beside the Trainer's files in each checkpoint-N/.
METHOD_STATE = "rxf_method_state.safetensors"
_SKIPPED_KEY = "rxf.skipped_updates"


@dataclass
class _RunGuards:
    """Options of an rxf training run beyond ``TrainingArguments`` and the methods'."""

    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Linear warm-up over this fraction of all updates, in [0, 1] (overrides warmup_steps)."},
    )
    max_nonfinite_updates: int = field(
        default=5,
        metadata={"help": "Stop the run after this many consecutive updates skipped for a non-finite loss or "
                          "gradient."},
    )

    def get_warmup_steps(self, num_training_steps: int) -> int:
        # TrainingArguments reads warmup_steps >= 1 as a count, so a ratio of 1.0 would be 1 update.
        if self.warmup_ratio is not None:
            return math.ceil(num_training_steps * self.warmup_ratio)
        return super().get_warmup_steps(num_training_steps)

    def validate_guards(self) -> None:
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio <= 1:
            raise OptionError(f"warmup_ratio (--warmup-ratio) must lie in [0, 1], got {self.warmup_ratio}")
        if self.max_nonfinite_updates < 1:
            raise OptionError(f"max_nonfinite_updates (--max-nonfinite-updates) must be >= 1, got "
                              f"{self.max_nonfinite_updates}")


@dataclass
class RXFConfig(_RunGuards, TrainingArguments, MethodOptions):
    """``TrainingArguments`` plus every method option of ``MethodOptions`` (see its
    fields' help texts; defaults follow Aghajanyan et al. 2021 and the reference code)
    and the run guards (``warmup_ratio``, ``max_nonfinite_updates``)."""

    def __post_init__(self):
        super().__post_init__()
        self.validate()
        self.validate_guards()


class RXFTrainer(Trainer):
    """A ``transformers.Trainer`` whose training update is the method named by
    ``args.method`` (an ``RXFConfig``). Evaluation is the plain forward pass.

    Attributes:
        method: the method's life cycle (``rxf.methods.build_method``).
        passes: ``{"forward": n, "backward": n}`` run by the last training batch, counted
            at run time by the method (SMART's teacher pass is counted separately as
            ``teacher_forward``).
        skipped_updates: updates skipped for a non-finite loss or gradient (all of them,
            across resumes).
    """

    def __init__(self, model=None, args: RXFConfig | None = None, **kwargs):
        if args is None:
            args = RXFConfig(output_dir="rxf_output")
        if not isinstance(args, MethodOptions) or not isinstance(args, _RunGuards):
            raise OptionError("RXFTrainer needs args=RXFConfig(...) (TrainingArguments plus the method options)")
        args.validate()
        args.validate_guards()
        self.method = build_method(args, model)
        if model is not None:
            # Before the optimiser is built, so that it holds the reparameterised weights.
            self.method.setup(model)
        own_optimizer = (kwargs.get("optimizers") or (None, None))[0] is not None  # the user's own: kept
        if not args.resolved_bias_correction() and kwargs.get("optimizer_cls_and_kwargs") is None and not own_optimizer:
            kwargs["optimizer_cls_and_kwargs"] = (
                AdamWNoBiasCorrection,
                {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                 # The kernel the Trainer gives std++'s AdamW (fused by default, on CPUs too): with
                 # another one std's seconds are not comparable (on CPUs the single-tensor path
                 # made std's updates ~40% slower, docs/performance.md).
                 "fused": args.optim == OptimizerNames.ADAMW_TORCH_FUSED},
            )
        super().__init__(model=model, args=args, **kwargs)
        # Classification: the task loss is a mean over the micro-batch, computed here from the
        # logits, so the Trainer's division by the accumulation steps is right. Generation:
        # the Trainer counts the scored target tokens of the whole accumulated batch and
        # passes them as num_items_in_batch, so each token weighs the same in every micro-batch.
        self.model_accepts_loss_kwargs = isinstance(self.method, Generation)
        self.passes: dict[str, int] = {}
        self.skipped_updates = 0
        self._consecutive_skips = 0
        self._update_finite: torch.Tensor | None = None
        self._clipped_norm = None
        self._method_logs: dict[str, list] = defaultdict(list)
        self._clock = _TrainClock()
        self.add_callback(self._clock)
        self.add_callback(_MethodHooks(self))

    @property
    def teacher(self):
        """SMART's EMA teacher (``None`` for other methods, without Bregman, or before
        the first update)."""
        return getattr(self.method, "teacher", None)

    # --- the update ----------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:  # evaluation: the plain forward pass
            if is_generation_model(model):
                outputs = model(**inputs)
                return (outputs.loss, outputs) if return_outputs else outputs.loss
            outputs = model(**model_inputs(inputs))
            loss = task_loss(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        if isinstance(self.method, Generation):
            # DataParallel (n_gpu > 1) splits the count across replicas; there the mean per micro-batch is kept.
            count = num_items_in_batch if self.args.n_gpu <= 1 else None
            loss, logs = self.method.loss(model, inputs, num_items_in_batch=count)
            if count is not None and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # The count covers every process and DDP averages gradients across them.
                loss = loss * self.accelerator.num_processes
            self.loss_is_scaled_for_ga = count is not None
        else:
            loss, logs = self.method.loss(model, inputs)
        self._record(logs)
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.method.runs_own_backward:  # a loss: the Trainer's step runs its backward
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:  # a method that runs its own backward calls (FreeLB)
            model.train()
            inputs = self._prepare_inputs(inputs)
            accumulation = self.current_gradient_accumulation_steps
            distributed = self.accelerator.num_processes > 1
            with self.compute_loss_context_manager():
                loss, logs = self.method.step(
                    model,
                    inputs,
                    backward=lambda step_loss: self.accelerator.backward(step_loss / accumulation),
                    update=self.state.global_step,
                    no_sync=(lambda: self.accelerator.no_sync(model)) if distributed else None,
                )
            self._record(logs)
            loss = loss / accumulation
        finite = torch.isfinite(loss.detach())
        self._update_finite = finite if self._update_finite is None else self._update_finite & finite
        return loss

    def _training_batches(self):
        """The training batches on the model's device, for ``Method.prepare``."""
        for batch in self.get_train_dataloader():
            yield self._prepare_inputs(batch)

    # --- non-finite updates ------------------------------------------------------------
    def _guard_update(self) -> None:
        """Before the optimiser step: drop a non-finite update's gradients (AdamW leaves a
        parameter without a gradient untouched, moments and decay included)."""
        finite = self._update_finite if self._update_finite is not None else torch.ones((), dtype=torch.bool)
        norm, self._update_finite, self._clipped_norm = self._clipped_norm, None, None
        if self.accelerator.scaler is None:  # fp16's scaler skips overflowing gradients itself
            if norm is None:  # no clipping this run: the norm has not been computed yet
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads) if grads else None
            if norm is not None:
                norm = whole(torch.as_tensor(norm))
                finite = finite.to(norm.device) & torch.isfinite(norm)
        if bool(finite):
            self._consecutive_skips = 0
            return
        self.model.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.args.max_nonfinite_updates:
            raise TrainingDiverged(
                f"training diverged: {self._consecutive_skips} consecutive updates (up to update "
                f"{self.state.global_step + 1}) had a non-finite loss or gradient and were skipped "
                f"(max_nonfinite_updates {self.args.max_nonfinite_updates}); try a smaller learning rate or "
                "noise scale"
            )

    def _clip_grad_norm(self, model):
        # Kept for the non-finite check, which then needs no second pass over the gradients.
        self._clipped_norm = super()._clip_grad_norm(model)
        return self._clipped_norm

    def _determine_best_metric(self, metrics, trial):
        name = self.args.metric_for_best_model
        value = metrics.get(name if name.startswith("eval_") else f"eval_{name}") if name else None
        if value is not None and (not math.isfinite(value) or not _weights_finite(self.model)):
            return False  # a diverged model is never the best one, whatever its majority-class score
        return super()._determine_best_metric(metrics, trial)

    # --- checkpoints: the method's state beside the Trainer's ----------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # Written before trainer_state.json, which marks a checkpoint complete.
        state = {k: whole(v).detach().contiguous().cpu() for k, v in self.method.state_dict(self.model).items()}
        state[_SKIPPED_KEY] = torch.tensor(self.skipped_updates)
        if self.args.should_save:
            from safetensors.torch import save_file

            save_file(state, os.path.join(output_dir, METHOD_STATE))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Only the newest checkpoint is resumed from: older ones (the best one kept by the
        # rotation) need their weights, not the optimiser's moments (2x the model's size).
        if self.args.should_save:
            newest = f"checkpoint-{self.state.global_step}"
            for folder in Path(self._get_output_dir(trial)).glob("checkpoint-*"):
                if folder.name != newest:
                    (folder / "optimizer.pt").unlink(missing_ok=True)

    def _load_method_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, METHOD_STATE)
        if not os.path.isfile(path):
            raise OptionError(
                f"{checkpoint}: no {METHOD_STATE} (a checkpoint of another rxf version or of a plain Trainer); "
                "it cannot be resumed exactly: start again with --overwrite"
            )
        from safetensors.torch import load_file

        state = load_file(path)
        self.skipped_updates = int(state.pop(_SKIPPED_KEY, torch.tensor(0)))
        self.method.load_state_dict(self.model, state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_method_state(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        skipped = self.skipped_updates  # a count of the whole run, not of the best checkpoint
        self._load_method_state(self.state.best_model_checkpoint)
        self.skipped_updates = skipped

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
        if "loss" in logs:
            logs["skipped_updates"] = self.skipped_updates
        if self._clock.running:
            logs["train_seconds"] = round(self._clock.seconds(), 3)
        super().log(logs, start_time)

    def evaluate(self, *args, **kwargs):
        self.method.before_eval(self.model)
        with self._clock.paused():
            return super().evaluate(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        # R4F's state dict folds W / sigma into plain weights; settle sigma first.
        self.method.before_eval(self.model)
        super()._save(output_dir, state_dict)


@dataclass
class RXFSeq2SeqConfig(_RunGuards, Seq2SeqTrainingArguments, MethodOptions):
    """``Seq2SeqTrainingArguments`` (generation during evaluation) plus the method options."""

    def __post_init__(self):
        super().__post_init__()
        self.validate()
        self.validate_guards()


class RXFSeq2SeqTrainer(RXFTrainer, Seq2SeqTrainer):
    """``RXFTrainer`` on ``Seq2SeqTrainer``: R3F for summarisation, with evaluation by
    generation (``predict_with_generate``). Takes an ``RXFSeq2SeqConfig``."""


def _weights_finite(model: torch.nn.Module) -> bool:
    return bool(torch.isfinite(whole(torch.nn.utils.get_total_norm([p.detach() for p in model.parameters()]))))


class _MethodHooks(TrainerCallback):
    """The method's hooks around the optimiser step: the non-finite guard before it,
    ``after_step`` (SMART: move the teacher) after it; and an evaluation of the last update."""

    def __init__(self, trainer: RXFTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # After a resume's checkpoint was loaded: a method whose state came with it skips this.
        self.trainer.method.prepare(self.trainer.model, self.trainer._training_batches())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_update()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.method.after_step(self.trainer.model, state.global_step, state.max_steps)
        if state.global_step == state.max_steps and args.eval_strategy != "no":
            # The last update is always evaluated (and checkpointed): "final" metrics are the
            # final model's, whether or not the run's length is a multiple of eval_steps.
            control.should_evaluate = True
            control.should_save = args.save_strategy != "no"


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


def best_checkpoint_seconds(log_history: list[dict], best_step: int | None) -> float | None:
    """Training seconds at the evaluation of step ``best_step`` (the best checkpoint)."""
    for entry in log_history:
        if entry.get("step") == best_step and "train_seconds" in entry and any(k.startswith("eval_") for k in entry):
            return entry["train_seconds"]
    return None
