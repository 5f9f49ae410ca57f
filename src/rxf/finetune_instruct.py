"""One instruction-tuning run (``rxf finetune --task instruct``): prompt/response or chat
JSONL -> causal LM (optionally with LoRA adapters, PEFT) -> RXFTrainer (label-smoothed CE
on the response tokens, plus R3F's or R-Drop's token-level KL, or NEFTune's noise) ->
evaluation by response-token loss and perplexity on the dev file -> best checkpoint and
``results.json``. The same folder layout and resume behaviour as ``rxf.finetune``.

Evaluation: ``loss`` is the cross entropy (no label smoothing) averaged over *all*
response tokens of the dev file — not a mean of per-batch means, so it does not depend on
``--eval-batch-size`` — and ``perplexity`` is exp(loss); the best checkpoint is the one
with the lowest dev loss. With ``--lora-r``, ``best/`` holds the adapter (PEFT's
``adapter_config.json`` and ``adapter_model.safetensors``, read with
``peft.AutoPeftModelForCausalLM.from_pretrained(best)``) and the tokenizer, not a copy of
the base model.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

from rxf.errors import OptionError
from rxf.finetune import (
    FinetuneSpec, check_run_folder, finish_run, load_model, load_tokenizer, open_run_folder, run_record,
    train_and_report, training_arguments, validate_spec,
)
from rxf.models import check_max_length
from rxf.methods.options import MethodOptions
from rxf.tasks.instruct import IGNORE, INSTRUCT_TASK, encode, load_instructions

INSTRUCT_METHODS = ("std", "std++", "r3f", "rdrop", "neftune")
INSTRUCT_EXTRAS = ("neftune",)


def check_instruct_method(options: MethodOptions) -> None:
    """Refuse the methods not offered for instruction tuning (R4F's head g has no weights
    in a language model; SMART, FreeLB and the other modifiers are classification's)."""
    if options.method not in INSTRUCT_METHODS:
        raise OptionError(f"--method {options.method} is not offered for --task instruct; choose from "
                          f"{', '.join(INSTRUCT_METHODS)}")
    others = [name for name in options.resolved_extras() if name not in INSTRUCT_EXTRAS]
    if others:
        raise OptionError(f"--extras {others[0]} is not offered for --task instruct; only "
                          f"{', '.join(INSTRUCT_EXTRAS)} is")


def lora_config(spec: FinetuneSpec):
    """PEFT's ``LoraConfig`` for ``--lora-r`` (None when it is 0: full fine-tuning)."""
    if not spec.lora_r:
        return None
    if importlib.util.find_spec("peft") is None:
        raise OptionError("--lora-r: LoRA needs the peft package: pip install peft")
    from peft import LoraConfig

    targets = spec.lora_target_modules.strip()
    return LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, task_type="CAUSAL_LM",
        # "all-linear": PEFT's every linear layer (GPT-2's Conv1D too) but the output layer.
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
    )


def pad_right(pad_id: int):
    """A collator padding to the batch's longest example, on the right: (B, T) input_ids
    (``pad_id``), attention_mask (0 on padding) and labels (-100 on padding)."""
    import torch

    def collate(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            gap = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * gap)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * gap)
            batch["labels"].append(list(f["labels"]) + [IGNORE] * gap)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    return collate


def response_nll(logits, labels):
    """Per example: the summed cross entropy over its response tokens and their count,
    (B, T, V), (B, T) -> (B, 2) float32. Position t predicts token t + 1."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return torch.stack([nll.sum(dim=1), (targets != IGNORE).sum(dim=1).float()], dim=1)


def _instruct_trainer_class():
    import torch

    from rxf.models import model_inputs
    from rxf.trainer import RXFTrainer

    class InstructTrainer(RXFTrainer):
        """``RXFTrainer`` whose evaluation is the response-token loss over the whole
        split: each batch returns its examples' summed NLL and token counts (B, 2), and
        the loss is their ratio over the split (the Trainer's own ``eval_loss`` is a mean
        of per-batch means weighted by examples, and would need the (B, T, V) logits
        gathered for anything finer)."""

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = model(**model_inputs(inputs), use_cache=False).logits
            return None, response_nll(logits, inputs["labels"]), None

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            stats = np.asarray(output.predictions, dtype=np.float64).reshape(-1, 2).sum(axis=0)
            loss = float(stats[0] / stats[1]) if stats[1] else float("nan")
            output.metrics.update({f"{prefix}_loss": loss, f"{prefix}_response_tokens": int(stats[1]),
                                   f"{prefix}_perplexity": float("inf") if loss > 700 else math.exp(loss)})
            return output

    return InstructTrainer


def run_instruct(spec: FinetuneSpec, options: MethodOptions) -> dict:
    """Fine-tune a causal LM on instruction data; returns (and writes) results.json's
    content, with the dev response-token loss and perplexity of each evaluation."""
    validate_spec(spec)
    options.validate()
    check_instruct_method(options)
    if spec.model is None:
        raise OptionError("--model: --task instruct needs a causal language model (a Hugging Face name or a local "
                          "folder); the embedded MiniLM is an encoder")
    lora = lora_config(spec)
    out = Path(spec.output_dir)
    splits = load_instructions(spec)
    splits = {name: split.head(spec.max_train_samples if name == "train" else spec.max_eval_samples)
              for name, split in splits.items()}

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    from rxf.trainer import RXFConfig

    record = run_record(spec, options, spec.model, splits)
    finished = check_run_folder(out, record, spec.overwrite)
    if finished is not None:
        return finished
    tokenizer = load_tokenizer(spec.model, spec)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # saved with best/, for batched generation later
    # Tokenised before anything is written: a chat file without a template is refused here.
    encoded = {name: encode(split, tokenizer, spec.max_length) for name, split in splits.items()}
    for name, (_, stats) in encoded.items():
        if stats["dropped"]:
            print(f"rxf: {name}: dropped {stats['dropped']} of {len(splits[name])} examples whose prompt fills "
                  f"--max-length {spec.max_length} (no response token left)", file=sys.stderr)
    set_seed(spec.seed)
    # Full fine-tuning keeps float32 master weights (--precision bf16/fp16 autocasts); with
    # LoRA the frozen base keeps the checkpoint's dtype and PEFT holds the adapters in float32.
    model = load_model(AutoModelForCausalLM, spec.model, spec, **({} if lora else {"dtype": torch.float32}))
    if lora is not None:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:  # e.g. target modules the model does not have
            raise OptionError(f"--lora-target-modules: {str(exc).strip().splitlines()[0]}") from None
    check_max_length("--max-length", spec.max_length, model, tokenizer)
    open_run_folder(out, record, spec.overwrite)
    datasets = {name: Dataset.from_dict(columns) for name, (columns, _) in encoded.items()}
    # Evaluation in order of length: less padding; the token mean does not depend on the order.
    dev = datasets["dev"]
    datasets["dev"] = dev.select(np.argsort([len(ids) for ids in dev["input_ids"]], kind="stable"))

    config = training_arguments(RXFConfig, spec, options, out, "dev_loss")
    config.greater_is_better = False  # training_arguments sets True (accuracy, ROUGE); a loss is lower-better
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way
    trainer = _instruct_trainer_class()(
        model=model, args=config, train_dataset=datasets["train"], eval_dataset={"dev": datasets["dev"]},
        processing_class=tokenizer, data_collator=pad_right(pad_id),
    )
    data_info = {name: {"source": split.source, "examples": len(split), **encoded[name][1]}
                 for name, split in splits.items()}
    results = train_and_report(trainer, spec, options, INSTRUCT_TASK, spec.model, data_info, ["dev"], "loss",
                               write=False)
    results["best_checkpoint"] = "lora_adapter" if lora is not None else "model"
    finish_run(trainer, spec, results)
    return results
