"""One fine-tuning run, start to finish: data -> model -> RXFTrainer -> best checkpoint
-> ``results.json``. This is what ``rxf finetune`` calls; ``rxf compare`` and the
representation experiments call it once per run.

Output folder:
    checkpoints/checkpoint-N/   Trainer checkpoints (resumed from when rerun)
    best/                       the best checkpoint (safetensors; plain from_pretrained)
    results.json                written last and atomically: its presence means done
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rxf.errors import OptionError
from rxf.methods.options import MethodOptions
from rxf.models import classification_head
from rxf.tasks.glue import ClassificationTask, get_task
from rxf.tasks.loading import Examples, load_hub, load_local, parse_column_map

RESULTS = "results.json"


@dataclass
class FinetuneSpec:
    """Everything about a run except the method's options (see ``MethodOptions``)."""

    task: str
    output_dir: str
    model: str | None = None  # None: the embedded MiniLM (rxf.defaults)
    data_dir: str | None = None  # None: the Hugging Face hub
    train_file: str | None = None
    dev_file: str | None = None
    columns: str | None = None
    seed: int = 42
    epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_steps: int | None = None  # None: evaluate (and checkpoint) every epoch
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    precision: str = "fp32"
    report_to: str = "none"
    save_total_limit: int = 2
    trust_remote_code: bool = False
    fresh_head: bool = False  # re-initialise the task head after loading (chain stages)
    # Generation (summarisation) only: target length and decoding.
    max_target_length: int = 64
    min_target_length: int = 0
    num_beams: int = 4
    no_repeat_ngram_size: int = 3
    overwrite: bool = False
    progress: bool = True


def load_task_data(spec: FinetuneSpec, task: ClassificationTask | None = None) -> dict[str, Examples]:
    """The train and dev splits, truncated to the requested sizes."""
    task = task or get_task(spec.task)
    if spec.data_dir is None and spec.train_file is None:
        splits = load_hub(task, spec.trust_remote_code)
    else:
        if spec.data_dir is not None and not Path(spec.data_dir).is_dir():
            raise OptionError(f"--data-dir: {spec.data_dir} is not a folder")
        splits = load_local(
            task, Path(spec.data_dir or "."), parse_column_map(spec.columns), spec.train_file, spec.dev_file
        )
    return {
        name: examples.head(spec.max_train_samples if name == "train" else spec.max_eval_samples)
        for name, examples in splits.items()
    }


def validate_spec(spec: FinetuneSpec) -> None:
    """Raise OptionError naming the first training option rxf cannot use."""
    positive = {"--batch-size": spec.batch_size, "--max-length": spec.max_length,
                "--gradient-accumulation-steps": spec.gradient_accumulation_steps}
    for flag, value in positive.items():
        if value < 1:
            raise OptionError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--max-train-samples": spec.max_train_samples, "--max-eval-samples": spec.max_eval_samples,
                        "--eval-steps": spec.eval_steps}.items():
        if value is not None and value < 1:
            raise OptionError(f"{flag} must be >= 1, got {value}")
    if spec.epochs <= 0 and spec.max_steps <= 0:
        raise OptionError("--epochs must be > 0 (or set --max-steps)")
    if spec.learning_rate <= 0:
        raise OptionError(f"--learning-rate must be > 0, got {spec.learning_rate}")
    if spec.precision not in ("fp32", "bf16", "fp16"):
        raise OptionError(f"--precision must be fp32, bf16 or fp16, got {spec.precision!r}")


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
    """Fine-tune, keep the best checkpoint, write and return ``results.json``'s content.

    A finished run (``results.json`` present) is returned as is unless
    ``spec.overwrite``; an interrupted one resumes from its last complete checkpoint.
    Every input is checked before anything is written. ``task`` overrides the GLUE
    task named by ``spec.task`` (the demo uses its own).
    """
    validate_spec(spec)
    options.validate()
    task = task or get_task(spec.task)
    out = Path(spec.output_dir)
    results_path = out / RESULTS
    if results_path.is_file() and not spec.overwrite:
        return json.loads(results_path.read_text())

    splits = load_task_data(spec, task)
    model_path = spec.model
    if model_path is None:
        from rxf.defaults import default_model_path

        model_path = default_model_path()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    from rxf.tasks.tokenize import tokenize
    from rxf.trainer import RXFConfig, RXFTrainer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise OptionError(f"--model: cannot load a tokenizer from {model_path!r} ({exc})") from None
    datasets = {name: tokenize(examples, tokenizer, spec.max_length) for name, examples in splits.items()}

    if spec.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(spec.seed)
    label_names = task.label_names or task.labels or ()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        id2label=dict(enumerate(label_names)) if label_names else None,
        label2id={name: i for i, name in enumerate(label_names)} if label_names else None,
        # A checkpoint fine-tuned on another task (a chain stage) has a head of another size.
        ignore_mismatched_sizes=True,
        trust_remote_code=spec.trust_remote_code,
    )

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
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
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
        warmup_steps=spec.warmup_ratio,  # a float in [0, 1) is a ratio of all updates
        weight_decay=spec.weight_decay,
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
    resume = last_complete_checkpoint(out / "checkpoints")
    if resume is not None:
        print(f"rxf: resuming from {resume}", file=sys.stderr)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(out / "best"))

    history = trainer.state.log_history
    evals = [e for e in history if any(k.startswith("eval_") for k in e)]
    best_step = trainer.state.best_global_step
    best = next((e for e in evals if e["step"] == best_step), evals[-1])
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
        "passes_per_update": trainer.passes,
        "history": [{k: v for k, v in e.items()} for e in evals],
        "spec": dataclasses.asdict(spec),
        "config": trainer.args.to_dict(),
        "versions": {
            "rxf": _version("rxf"), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": _version("accelerate"), "datasets": _version("datasets"), "python": platform.python_version(),
        },
        "hardware": _hardware(torch),
    }
    if write and trainer.is_world_process_zero():
        write_json_atomic(out / RESULTS, results)
    return results


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


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file and rename it over ``path``: readers never see a
    half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
