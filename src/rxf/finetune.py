"""One fine-tuning run, start to finish: data -> model -> RXFTrainer -> best checkpoint
-> ``results.json``. This is what ``rxf finetune`` calls; ``rxf compare`` and the
representation experiments call it once per run.

Output folder:
    run.json                    the options and data that define the run, written first
    checkpoints/checkpoint-N/   Trainer checkpoints (resumed from when rerun); removed once
                                the run has finished, unless ``keep_checkpoints``
    best/                       the best checkpoint (safetensors; plain from_pretrained)
    results.json                written last and atomically: its presence means done

A rerun of the same run resumes it (or returns its results when it has finished); a
rerun that differs in any defining option or in its data is refused, naming what
differs, unless ``overwrite`` starts it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

from rxf.console import new_weights_line, take_over_console
from rxf.errors import OptionError, TrainingDiverged, unloadable_model
from rxf.jsonio import write_json_atomic
from rxf.methods.options import MethodOptions
from rxf.spec import FinetuneSpec, validate_spec
from rxf.models import check_max_length, check_model_folder, classification_head, model_fingerprint
from rxf.tasks.data import task_and_data
from rxf.tasks.glue import ClassificationTask

RESULTS = "results.json"
RUN_RECORD = "run.json"
# Spec fields that change where or how a run reports, not what it computes.
NOT_DEFINING = ("output_dir", "overwrite", "progress", "report_to", "eval_batch_size", "save_total_limit",
                "keep_checkpoints")


def data_fingerprint(splits: dict) -> dict[str, str]:
    """A digest of each split's content (texts and labels, or sources and targets)."""
    digests = {}
    for name, split in splits.items():
        fields = {k: v for k, v in dataclasses.asdict(split).items() if k != "source"}
        digests[name] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return digests


def processes() -> int:
    """Processes training together: torchrun and accelerate launch set WORLD_SIZE. With
    ``--batch-size`` per process, it sets the examples per update."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_record(spec: FinetuneSpec, options: MethodOptions, model_path: str, splits: dict) -> dict:
    """What defines a run: its options (all but where and how it reports), the number of
    processes (the batch is per process), the model and the content of its data."""
    defining = {k: v for k, v in dataclasses.asdict(spec).items() if k not in NOT_DEFINING}
    return {"spec": defining | {"model": str(model_path)}, "options": dataclasses.asdict(options),
            "processes": processes(), "data": data_fingerprint(splits),
            "model_files": model_fingerprint(str(model_path))}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} ({a!r} there, {b!r} now)")
    return found


# compare, sweep, chain and cycle take no --overwrite (it would start every run again).
START_AGAIN = ("start again: rxf finetune --overwrite, or, for a run of compare, sweep, chain or cycle, delete that "
               "folder (in a chain, with the stages after it)")


def check_run_folder(out: Path, record: dict, overwrite: bool) -> dict | None:
    """Whether ``out`` may hold this run: returns the finished run's results when it is
    this run and has finished, ``None`` when it can be started or resumed; raises
    OptionError when the folder holds another run (or something else) and not
    ``overwrite``."""
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return None
    record_path = out / RUN_RECORD
    if not record_path.is_file():
        raise OptionError(f"--output-dir: {out} is not empty and holds no {RUN_RECORD} (not an rxf run of this "
                          f"version): choose another folder, or {START_AGAIN}")
    old = json.loads(record_path.read_text())
    # An option added to rxf after the run was recorded, at its default, changes nothing:
    # the run was made with that default's behaviour.
    defaults = {"spec": dataclasses.asdict(FinetuneSpec()), "options": dataclasses.asdict(MethodOptions())}
    for section, values in defaults.items():
        recorded = old.setdefault(section, {})
        for key in record.get(section, {}):
            if key not in recorded and key in values:
                recorded[key] = values[key]
    # A run recorded before rxf kept the model files' fingerprint is taken as made from the
    # model now at its path: nothing else is known of it.
    old.setdefault("model_files", record.get("model_files"))
    # Likewise, one recorded before rxf kept the number of processes ran in one unless
    # told otherwise: rxf cannot know, and one is how every documented run was made.
    old.setdefault("processes", 1)
    differs = _differences(old, json.loads(json.dumps(record)))
    if differs:
        raise OptionError(f"--output-dir: {out} holds another run, which differs in "
                          f"{'; '.join(differs[:6])}{' ...' if len(differs) > 6 else ''}: choose another folder, "
                          f"or {START_AGAIN}")
    results = out / RESULTS
    return json.loads(results.read_text()) if results.is_file() else None


def open_run_folder(out: Path, record: dict, overwrite: bool) -> None:
    """Create (or, with ``overwrite``, empty) the run folder, write ``run.json`` and
    remove what a kill during the last save left behind."""
    try:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_RECORD, record)
    except OSError as exc:
        raise OptionError(f"--output-dir: cannot write to {out} ({exc.strerror or exc})") from None
    for leftover in {*out.glob(".best.tmp*"), *out.glob("best/.tmp*"), *out.glob("*.tmp[0-9]*")}:
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def load_model(loader, model_path: str, spec: FinetuneSpec, report_new_weights: bool = False, **kwargs):
    """``loader.from_pretrained`` with a one-line error naming ``--model`` when the folder
    or its weights cannot be read (missing, corrupt or truncated files); with
    ``report_new_weights``, ``(model, line)``: the line names the weights initialised at
    random (the head), or is None."""
    try:
        loaded = loader.from_pretrained(model_path, trust_remote_code=spec.trust_remote_code,
                                        **({"output_loading_info": True} if report_new_weights else {}), **kwargs)
    except Exception as exc:  # OSError, ValueError, safetensors' and torch's errors alike
        raise unloadable_model("--model", model_path, exc) from None
    if not report_new_weights:
        return loaded
    model, info = loaded
    return model, new_weights_line(info)


def load_tokenizer(model_path: str, spec: FinetuneSpec):
    """The model's tokenizer; a local folder without one is refused (``check_model_folder``)."""
    from transformers import AutoTokenizer

    check_model_folder("--model", model_path)
    return load_model(AutoTokenizer, model_path, spec)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose trainer state was written (the Trainer writes
    it last); newer, incomplete ones (a run killed while saving) are removed."""
    if not folder.is_dir():
        return None
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for checkpoint in reversed(checkpoints):
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def run_finetune(spec: FinetuneSpec, options: MethodOptions, task: ClassificationTask | None = None) -> dict:
    """Fine-tune, keep the best checkpoint, write and return ``results.json``'s content
    (a summarisation task goes to ``rxf.finetune_generation.run_generation``).

    A finished run is returned as is; an interrupted one resumes from its last complete
    checkpoint; a folder holding a different run is refused (``spec.overwrite`` starts
    again). Every input — options, data, model — is checked before anything is written.
    ``task`` overrides the GLUE task named by ``spec.task`` (the demo uses its own).
    """
    from rxf.tasks.summarization import SUMMARIZATION_TASKS

    if task is None and spec.task in SUMMARIZATION_TASKS:
        from rxf.finetune_generation import run_generation

        return run_generation(spec, options, SUMMARIZATION_TASKS[spec.task])
    if task is None and spec.task == "instruct":
        from rxf.finetune_instruct import run_instruct
        return run_instruct(spec, options)
    validate_spec(spec)
    options.validate()
    from rxf.tasks.generic import settle_spec

    task, splits = task_and_data(spec, task)
    # A task defined by the user's files: its resolved columns and label set are part of
    # the run's identity (run.json) and of results.json, given or discovered.
    spec = settle_spec(spec, task)
    out = Path(spec.output_dir)
    model_path = spec.model
    if model_path is None:
        from rxf.defaults import default_model_path

        model_path = default_model_path()
    record = run_record(spec, options, model_path, splits)
    finished = check_run_folder(out, record, spec.overwrite)
    if finished is not None:
        return finished

    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

    from rxf.tasks.tokenize import tokenize
    from rxf.trainer import RXFConfig, RXFTrainer

    tokenizer = load_tokenizer(model_path, spec)
    set_seed(spec.seed)
    label_names = task.label_names or task.labels or ()
    labels = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    model, new_weights = load_model(
        AutoModelForSequenceClassification, model_path, spec, report_new_weights=True,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        # A regression head has one output and no label names (an id2label of None
        # would override num_labels).
        **(labels if label_names else {}),
        # A checkpoint fine-tuned on another task (a chain stage) has a head of another size.
        ignore_mismatched_sizes=True,
    )
    check_max_length("--max-length", spec.max_length, model, tokenizer)
    open_run_folder(out, record, spec.overwrite)
    if new_weights and int(os.environ.get("RANK", "0")) == 0:  # once every check passed; once per run
        print(new_weights, file=sys.stderr)
    datasets = {name: tokenize(examples, tokenizer, spec.max_length) for name, examples in splits.items()}
    for name in splits:
        if name != "train":
            # Evaluation in order of length: each batch pads to its own longest example, so
            # sorted batches carry little padding; the metrics do not depend on the order.
            datasets[name] = datasets[name].select(np.argsort([len(ids) for ids in datasets[name]["input_ids"]],
                                                              kind="stable"))

    if spec.fresh_head:
        # A chain stage keeps the previous stage's encoder but learns its task with a new head.
        for _, head in classification_head(model):
            head.apply(model._init_weights)
    dev_names = [name for name in splits if name != "train"]
    config = training_arguments(RXFConfig, spec, options, out, f"{dev_names[0]}_{task.main_metric}")

    def compute_metrics(prediction):
        logits = prediction.predictions
        predicted = logits.squeeze(-1) if task.is_regression else np.argmax(logits, axis=-1)
        return task.compute_metrics(predicted, prediction.label_ids)

    trainer = RXFTrainer(
        model=model,
        args=config,
        train_dataset=datasets["train"],
        eval_dataset={name: datasets[name] for name in dev_names},
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    data_info = {name: {"source": ex.source, "examples": len(ex)} for name, ex in splits.items()}
    return train_and_report(trainer, spec, options, task.name, model_path, data_info, dev_names, task.main_metric)


def training_arguments(config_cls, spec: FinetuneSpec, options: MethodOptions, out: Path, best_metric: str, **extra):
    """The Trainer configuration of a run: evaluate and checkpoint every epoch (or
    ``spec.eval_steps`` updates), keep the best checkpoint by ``best_metric``."""
    strategy = "steps" if spec.eval_steps else "epoch"
    import torch

    # Under torchrun on CPUs, Accelerate sets up DDP over gloo only when told to use the CPU.
    distributed_cpu = processes() > 1 and not torch.cuda.is_available()
    return config_cls(
        use_cpu=distributed_cpu,
        output_dir=str(out / "checkpoints"),
        seed=spec.seed,
        data_seed=spec.seed,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.eval_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        warmup_ratio=spec.warmup_ratio,
        max_nonfinite_updates=spec.max_nonfinite_updates,
        weight_decay=spec.weight_decay,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=spec.eval_steps,
        save_steps=spec.eval_steps,
        logging_steps=max(1, min(50, spec.eval_steps or 50)),
        load_best_model_at_end=True,
        metric_for_best_model=best_metric,
        greater_is_better=True,
        save_total_limit=spec.save_total_limit,
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        report_to=spec.report_to,
        disable_tqdm=not spec.progress,
        **dataclasses.asdict(options),
        **extra,
    )


def train_and_report(trainer, spec: FinetuneSpec, options: MethodOptions, task_name: str, model_path: str,
                     data_info: dict, dev_names: list[str], main_metric: str, write: bool = True) -> dict:
    """Train (resuming from the last complete checkpoint), save the best model in
    ``best/`` and write results.json last, atomically (``write=False``: the caller adds
    to the results and writes them)."""
    import torch
    import transformers

    from rxf.trainer import best_checkpoint_seconds

    out = Path(spec.output_dir)
    take_over_console(trainer, spec.progress)
    resume = last_complete_checkpoint(out / "checkpoints")
    if resume is not None:
        print(f"rxf: resuming from {resume}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    history = trainer.state.log_history
    evals = [e for e in history if any(k.startswith("eval_") for k in e)]
    best_step = trainer.state.best_global_step
    best = next((e for e in evals if e["step"] == best_step), None)
    if best is None:
        raise TrainingDiverged(f"{out}: no evaluation produced a finite {dev_names[0]} {main_metric} from a model "
                               "with finite weights; nothing is kept as the best checkpoint")
    save_best(trainer, out)
    results = {
        "task": task_name,
        "method": options.method,
        "seed": spec.seed,
        "model": model_path,
        "data": data_info,
        "best_step": best["step"],
        "best": _split_metrics(best, dev_names),
        "final": _split_metrics(evals[-1], dev_names),
        "main_metric": f"{dev_names[0]}/{main_metric}",
        "seconds_to_best": best_checkpoint_seconds(history, best["step"]),
        "train_seconds": max((e["train_seconds"] for e in history if "train_seconds" in e), default=None),
        "updates": trainer.state.global_step,
        "skipped_updates": trainer.skipped_updates,
        "passes_per_update": trainer.passes,
        "history": [{k: v for k, v in e.items()} for e in evals],
        "spec": dataclasses.asdict(spec),
        "config": trainer.args.to_dict(),
        "versions": {
            "rxf": _version("rxf"), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": _version("accelerate"), "datasets": _version("datasets"), "python": platform.python_version(),
        },
        # Under torchrun each update is processes x batch_size x accumulation examples.
        "hardware": _hardware(torch) | {"processes": trainer.args.world_size},
    }
    if write:
        finish_run(trainer, spec, results)
    return results


def save_best(trainer, out: Path) -> None:
    """Save the best model (loaded at the end of training) as ``best/``, atomically: it
    is written beside and renamed into place, so a kill never leaves half a model there."""
    tmp = out / f".best.tmp{os.getpid()}"
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        shutil.rmtree(out / "best", ignore_errors=True)
        os.replace(tmp, out / "best")


def finish_run(trainer, spec: FinetuneSpec, results: dict) -> None:
    """Write ``results.json`` (its presence marks the run finished), then drop the
    checkpoints, which only a resume needs, unless ``spec.keep_checkpoints``."""
    if not trainer.is_world_process_zero():
        return
    out = Path(spec.output_dir)
    write_json_atomic(out / RESULTS, results)
    if not spec.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _split_metrics(entry: dict, dev_names: list[str]) -> dict[str, dict[str, float]]:
    metrics = {}
    for name in dev_names:
        prefix = f"eval_{name}_"
        values = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix)}
        if values:
            metrics[name] = {k: v for k, v in values.items() if k not in ("runtime", "samples_per_second", "steps_per_second")}
    return metrics


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _hardware(torch) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
