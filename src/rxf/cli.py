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
from pathlib import Path

from rxf.errors import OptionError, RXFError
from rxf.methods.options import MethodOptions
from rxf.tasks.generic import GENERIC_TASKS
from rxf.tasks.glue import GLUE_TASKS
from rxf.tasks.summarization import SUMMARIZATION_TASKS


def add_field_flag(group, f: dataclasses.Field, default, hint) -> None:
    """One ``--flag`` for a dataclass field: its type (a boolean gets ``--flag`` and
    ``--no-flag``), default, choices and the help text of its metadata."""
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    kwargs = {"default": default, "dest": f.name,
              "help": f.metadata["help"] + (" (default: %(default)s)" if default is not None else "")}
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = base
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``MethodOptions`` field."""
    group = parser.add_argument_group("method options")
    hints = typing.get_type_hints(MethodOptions)
    for f in dataclasses.fields(MethodOptions):
        add_field_flag(group, f, f.default, hints[f.name])


def method_options_from(args: argparse.Namespace) -> MethodOptions:
    return MethodOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MethodOptions)})


_GROUP_TITLES = {"training": "training", "data": "data",
                 "generation": "generation (summarisation tasks)"}


def add_spec_options(parser: argparse.ArgumentParser, groups=("training", "generation")) -> None:
    """One ``--flag`` per ``FinetuneSpec`` field of these groups, with its default and
    help text; a boolean gets ``--flag``/``--no-flag``."""
    from rxf.spec import FinetuneSpec, flag_fields

    defaults, hints = FinetuneSpec(), typing.get_type_hints(FinetuneSpec)
    for group in groups:
        g = parser.add_argument_group(_GROUP_TITLES[group])
        for f in flag_fields(group):
            add_field_flag(g, f, getattr(defaults, f.name), hints[f.name])


def add_training_options(parser: argparse.ArgumentParser, func) -> None:
    """Training, data and method options for a command that fine-tunes, and its handler."""
    add_spec_options(parser, ("training", "generation", "data"))
    add_method_options(parser)
    parser.set_defaults(func=func)


def spec_from(args: argparse.Namespace, task: str, output_dir: str):
    """The ``FinetuneSpec`` of a command's flags."""
    from rxf.spec import FinetuneSpec, flag_fields

    values = {f.name: getattr(args, f.name) for f in flag_fields() if hasattr(args, f.name)}
    return FinetuneSpec(task=task, output_dir=output_dir, overwrite=getattr(args, "overwrite", False), **values)


# The options of a task defined by the user's files (rxf.tasks.generic).
_GENERIC_OPTIONS = ("text_columns", "label_column", "labels", "header", "main_metric")


def _check_generic_options(args: argparse.Namespace, tasks: list[str]) -> None:
    """Refuse --text-columns & co. when no task is classification/regression: a GLUE
    task would ignore them (its columns are mapped with --columns)."""
    if any(task in GENERIC_TASKS for task in tasks):
        return
    for name in _GENERIC_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            flag = "--no-header" if value is False else "--" + name.replace("_", "-")
            raise OptionError(f"{flag}: applies to --task classification or regression (your own files); "
                              f"{', '.join(tasks)} has its own columns, mapped with --columns")


def _finetune_task(args: argparse.Namespace) -> str:
    """--task; without one, classification on the files given with --train-file."""
    task = args.task or ("classification" if args.train_file else None)
    if task is None:
        raise OptionError("--task: give a GLUE or summarisation task, or --train-file and --dev-file to fine-tune "
                          "on your own files (classification; --task regression for scores)")
    _check_generic_options(args, [task])
    return task


def cmd_finetune(args: argparse.Namespace) -> int:
    from rxf.finetune import run_finetune

    task = _finetune_task(args)
    results = run_finetune(spec_from(args, task, args.output_dir), method_options_from(args))
    print(f"{results['task']} {results['method']} seed {results['seed']}: best checkpoint at update "
          f"{results['best_step']} of {results['updates']} ({results['seconds_to_best']} s of training); "
          f"results in {args.output_dir}/results.json")
    print(metrics_table(results["best"]))
    return 0


def metrics_table(by_split: dict[str, dict[str, float]]) -> str:
    """{split: {metric: value}} as a small Markdown table (``null`` metrics as ``–``)."""
    metrics = sorted({m for values in by_split.values() for m in values}, key=lambda m: (m == "loss", m))
    rows = ["| split | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for split, values in by_split.items():
        cells = [f"{values[m]:.4f}" if isinstance(values.get(m), (int, float)) else "–" for m in metrics]
        rows.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _split(text: str, option: str, kind=str) -> list:
    try:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise RXFError(f"{option}: cannot read {text!r} as a comma-separated list") from None
    if not items:
        raise RXFError(f"{option}: empty list")
    repeated = next((item for i, item in enumerate(items) if item in items[:i]), None)
    if repeated is not None:  # two runs of one folder at once would race each other (--jobs)
        raise RXFError(f"{option}: {repeated!r} is given twice")
    return items


def _tasks(text: str, args: argparse.Namespace) -> list[str]:
    """The --tasks list: GLUE tasks, and where the command allows it one task on your own
    files (classification or regression, see ``_check_generic_tasks``)."""
    tasks = _split(text, "--tasks")
    for task in tasks:
        if task not in GLUE_TASKS and task not in GENERIC_TASKS:
            raise RXFError(f"--tasks: unknown task {task!r}; choose from {', '.join(GLUE_TASKS)}, "
                           f"or {' or '.join(GENERIC_TASKS)} for your own files")
    _check_generic_tasks(tasks, args.command)
    _check_generic_options(args, tasks)
    return tasks


def _check_generic_tasks(tasks: list[str], command: str) -> None:
    """Where a task on your own files fits: alone in compare and sweep (it reads the
    shared --train-file/--dev-file or --data-dir), once and after the probed source
    task in a chain (its folder from --task-data classification=DIR). probe and cycle
    probe every task with a GLUE task definition and take GLUE tasks only."""
    generic = [task for task in tasks if task in GENERIC_TASKS]
    if not generic:
        return
    if command in ("probe", "cycle"):
        raise RXFError(f"--tasks: rxf {command} takes GLUE tasks only, not {generic[0]}")
    if command in ("compare", "sweep") and len(tasks) > 1:
        raise RXFError(f"--tasks: {generic[0]} reads --train-file/--dev-file (or --data-dir): give it as the only task")
    if command == "chain" and (tasks[0] in GENERIC_TASKS or len(generic) > 1):
        raise RXFError("--tasks: in a chain, a task on your own files is one stage after the first (probed) task, "
                       "reading its folder from --task-data NAME=DIR")


def cmd_compare(args: argparse.Namespace) -> int:
    from rxf.experiments.compare import load_best_configs, run_compare

    tasks = _tasks(args.tasks, args)
    summary = run_compare(
        args.output_dir, tasks, _split(args.methods, "--methods"), _split(args.seeds, "--seeds", int),
        spec_from(args, tasks[0], args.output_dir), method_options_from(args), load_best_configs(args.configs),
        args.jobs,
    )
    print((Path(args.output_dir) / "report.md").read_text())
    return 0 if summary else 1


def cmd_report(args: argparse.Namespace) -> int:
    from rxf.experiments.report import write_report

    seeds = set(_split(args.seeds, "--seeds", int)) if args.seeds else None
    write_report([Path(r) for r in args.runs], Path(args.output_dir) if args.output_dir else None, seeds=seeds)
    print((Path(args.output_dir or args.runs[0]) / "report.md").read_text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rxf.experiments.sweep import parse_space, run_sweep

    tasks = _tasks(args.tasks, args)
    best = run_sweep(
        args.output_dir, tasks, _split(args.methods, "--methods"), args.budget, spec_from(args, tasks[0], args.output_dir),
        method_options_from(args), args.storage, parse_space(args.space), args.sampler_seed, args.jobs,
    )
    for task, methods in best.items():
        for method, found in methods.items():
            print(f"{task} {method}: best {found['value']:.4f} with {found['params']} ({found['trials']} trials)")
    print(f"best configurations: {Path(args.output_dir) / 'best_configs.json'} (rxf compare --configs)")
    return 0


def _checked_cost_options(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """``rxf cost``'s options checked before a model is built; its SMART and FreeLB step counts."""
    import torch

    if args.repeats < 1 or args.warmup < 0:
        raise OptionError("--repeats must be >= 1 and --warmup >= 0")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise OptionError(f"{flag} must be >= 1, got {value}")
    smart_steps, freelb_steps = _split(args.smart_steps, "--smart-steps", int), _split(args.freelb_steps,
                                                                                        "--freelb-steps", int)
    for flag, steps in (("--smart-steps", smart_steps), ("--freelb-steps", freelb_steps)):
        if min(steps) < 1:
            raise OptionError(f"{flag}: step counts must be >= 1, got {min(steps)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise OptionError(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    if args.repeats < 3 or args.warmup < 1:
        # The first update pays for allocation and kernel selection; one round has no median.
        print(f"rxf cost: warning: --repeats {args.repeats} --warmup {args.warmup} times too few updates for the "
              "ratios to mean much (use --repeats 5 --warmup 1 or more)", file=sys.stderr)
    return smart_steps, freelb_steps


def cmd_cost(args: argparse.Namespace) -> int:
    import json

    import torch

    from rxf.experiments.cost import build_model, measure, method_grid, random_batch, table
    from rxf.models import check_max_length

    smart_steps, freelb_steps = _checked_cost_options(args)
    model = build_model(args.model, args.config, args.trust_remote_code).to(args.device)
    check_max_length("--seq-len", args.seq_len, model, None)
    batch = random_batch(args.batch_size, args.seq_len, model.config.vocab_size, args.device)
    grid = method_grid(smart_steps, freelb_steps, regularisers=args.regularisers)
    rows = measure(model, batch, grid, args.device, args.bf16, args.warmup, args.repeats)
    print(f"# {args.model or args.config}, batch {args.batch_size} x {args.seq_len}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.device}, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved (shuffled) updates after {args.warmup} warm-up; ratios to std")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_xnli(args: argparse.Namespace) -> int:
    from rxf.experiments.xnli import parse_eval_columns, parse_language_specs, run_xnli

    languages = parse_language_specs(args.eval)
    report = run_xnli(
        Path(args.output_dir), _split(args.methods, "--methods"), spec_from(args, args.task, args.output_dir),
        method_options_from(args), languages, args.max_eval_samples, parse_eval_columns(args.eval_columns, languages),
    )
    print((Path(args.output_dir) / "xnli.md").read_text())
    return 0 if report else 1


def _pairs(items: list[str], option: str) -> dict[str, str]:
    """["a=x", "b=y"] (or "a=x,b=y") -> {"a": "x", "b": "y"}."""
    pairs = {}
    for item in (part for entry in items for part in entry.split(",") if part.strip()):
        if "=" not in item:
            raise RXFError(f"{option}: expected NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key.strip() in pairs:  # the later one would replace the earlier without a word
            raise RXFError(f"{option}: {key.strip()!r} is given twice")
        pairs[key.strip()] = value.strip()
    return pairs


def _task_pairs(items: list[str], option: str, tasks: list[str]) -> dict[str, str]:
    """TASK=VALUE pairs for tasks of --tasks only: a misspelt or absent task's value would
    otherwise be ignored (its folder read from --data-dir, its epochs from --epochs) without a word."""
    pairs = _pairs(items, option)
    for task in pairs:
        if task not in tasks:
            raise RXFError(f"{option}: {task!r} is not one of --tasks ({', '.join(tasks)})")
    return pairs


def _task_epochs(args: argparse.Namespace, tasks: list[str]) -> dict[str, float]:
    """--task-epochs TASK=N: a stage's own number of epochs."""
    epochs = {}
    for task, value in _task_pairs(args.task_epochs, "--task-epochs", tasks).items():
        try:
            epochs[task] = float(value)
        except ValueError:
            epochs[task] = float("nan")  # refused below with the positive-number message
        if not 0 < epochs[task] < float("inf"):
            raise RXFError(f"--task-epochs: {task}={value} is not a positive number of epochs")
    return epochs


def cmd_probe(args: argparse.Namespace) -> int:
    from rxf.defaults import default_model_path
    from rxf.probing.probe import run_probe

    tasks = _tasks(args.tasks, args)
    from rxf.probing.probe import checkpoints_from_runs

    checkpoints = _pairs(args.checkpoint, "--checkpoint")
    for folder in args.runs:
        found = checkpoints_from_runs(folder)
        if not found:
            raise RXFError(f"--runs: no finished run (results.json beside best/) below {folder}")
        checkpoints.update(found)
    if args.include_base or not checkpoints:
        checkpoints = {"pre-trained": args.model or default_model_path(), **checkpoints}
    reference = (args.model or default_model_path()) if args.reference == "base" else args.reference
    run_probe(Path(args.output_dir), checkpoints, tasks, spec_from(args, tasks[0], args.output_dir),
              _task_pairs(args.task_data, "--task-data", tasks), reference, args.cka_samples, args.pooling)
    print((Path(args.output_dir) / "probe.md").read_text())
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from rxf.experiments.chain import run_chain, run_cycle

    tasks = _tasks(args.tasks, args)
    base = spec_from(args, tasks[0], args.output_dir)
    methods = _split(args.methods, "--methods")
    task_data, task_epochs = _task_pairs(args.task_data, "--task-data", tasks), _task_epochs(args, tasks)
    if args.command == "cycle":
        run_cycle(Path(args.output_dir), tasks, methods, args.cycles, base, method_options_from(args), task_data,
                  args.pooling, task_epochs)
        print((Path(args.output_dir) / "cycle.md").read_text())
    else:
        run_chain(Path(args.output_dir), tasks, methods, base, method_options_from(args), task_data, args.jobs,
                  args.pooling, task_epochs)
        print((Path(args.output_dir) / "chain.md").read_text())
    return 0


def _checkpoint_and_reading(args: argparse.Namespace):
    from rxf.evaluate import load_classifier, reading_for

    classifier = load_classifier(args.checkpoint, args.task, args.trust_remote_code)
    reading = reading_for(classifier, args.text_columns, getattr(args, "label_column", None), args.header,
                          args.max_length, args.batch_size)
    return classifier, reading


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rxf.evaluate import evaluation_table, run_evaluate

    classifier, reading = _checkpoint_and_reading(args)
    report = run_evaluate(classifier, args.file, args.output, reading)
    print(evaluation_table(report), end="")
    print(f"report in {args.output}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rxf.evaluate import run_predict

    classifier, reading = _checkpoint_and_reading(args)
    summary = run_predict(classifier, args.file, args.output, reading, args.format)
    print(f"{summary['rows']} predictions ({summary['format']}, text from {', '.join(summary['text_columns'])}) "
          f"in {summary['output']}")
    return 0


def _add_inference_options(parser: argparse.ArgumentParser, labelled: bool) -> None:
    """The checkpoint and how input files are read, for evaluate and predict."""
    parser.add_argument("--checkpoint", required=True,
                        help="a fine-tuned model folder: a run's best/, or any from_pretrained folder with a "
                             "trained sequence-classification head")
    parser.add_argument("--task", default=None, choices=sorted(GLUE_TASKS) + list(GENERIC_TASKS),
                        help="the task the checkpoint learnt: a GLUE task's metrics, label strings and columns "
                             "(default: the run's, from run.json beside the checkpoint; else classification, or "
                             "regression for a one-output head)")
    parser.add_argument("--text-columns", default=None,
                        help="text column(s), comma-separated: names, or 0-based positions in files without a "
                             "header row (default: the run's; else the task's, or the first of sentence1+sentence2, "
                             "premise+hypothesis, question1+question2, text_a+text_b, text, sentence)")
    if labelled:
        parser.add_argument("--label-column", default=None,
                            help="label column, a name or position (default: the run's; else the task's, or label; "
                                 "the last column of a file without a header)")
    parser.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the first line of .tsv/.csv files names the columns (default: the run's; "
                             "else yes, unless the columns are given as positions)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the run's, or 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default: %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a model that runs its own code")


def cmd_demo(args: argparse.Namespace) -> int:
    from rxf.methods.options import check_methods

    methods = _split(args.methods, "--methods")
    check_methods(methods)  # all of them before the first trains
    from rxf.demo import run_demo

    run_demo(args.output_dir, methods=methods, seed=args.seed)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: its default prints the whole usage first (sixty
    lines for ``rxf finetune``), which buries the line that says what was wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rxf", description="Robust fine-tuning of pre-trained transformers "
                                     "(R3F, R4F, SMART, FreeLB, Standard, Standard++).")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = sub.choices

    p = sub.add_parser("finetune", help="fine-tune on a GLUE task or your own files and keep the best checkpoint")
    p.add_argument("--task", default=None,
                   choices=sorted(GLUE_TASKS) + sorted(SUMMARIZATION_TASKS) + list(GENERIC_TASKS) + ["instruct"],
                   help="GLUE task or summarisation task (lower case), or classification/regression on your own "
                        "--train-file/--dev-file (default: classification when --train-file is given), or instruct: "
                        "a causal LM on prompt/response or chat JSONL")
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints/, best/, results.json")
    p.add_argument("--overwrite", action="store_true", help="start again even if the run finished or has checkpoints")
    add_training_options(p, cmd_finetune)

    c = sub.add_parser("compare", help="tasks x methods x seeds, then tables and violin plots (Table 2, Figures 1-2)")
    c.add_argument("--tasks", required=True, help="comma-separated GLUE tasks, e.g. rte,mrpc")
    c.add_argument("--methods", default="std++,r3f,r4f", help="comma-separated methods (default: %(default)s)")
    c.add_argument("--seeds", default="1,2,3,4,5,6,7,8,9,10", help="comma-separated seeds (default: %(default)s)")
    c.add_argument("--configs", action="append", default=None,
                   help="best_configs.json from rxf sweep: per task and method settings; repeat it to merge "
                        "several sweeps' files (a task and method configured differently in two is refused)")
    c.add_argument("--output-dir", required=True, help="runs/<task>/<method>/seed<N>/, report.md, plots")
    c.add_argument("--jobs", type=int, default=1, help="runs at once, the cores divided between them (default: 1)")
    add_training_options(c, cmd_compare)

    r = sub.add_parser("report", help="rebuild tables and plots from a folder of results.json files")
    r.add_argument("--runs", required=True, action="append",
                   help="folder searched recursively for results.json; repeat it to pool folders (e.g. seeds "
                        "run into other output folders)")
    r.add_argument("--output-dir", default=None,
                   help="where report.md and the plots go (default: --runs; needed with several --runs)")
    r.add_argument("--seeds", default=None,
                   help="comma-separated seeds to report (default: all), e.g. all but the seed a sweep chose on")
    r.set_defaults(func=cmd_report)

    w = sub.add_parser("sweep", help="fixed-budget hyper-parameter search per method with Optuna")
    w.add_argument("--tasks", required=True, help="comma-separated GLUE tasks")
    w.add_argument("--methods", default="std++,r3f,r4f", help="comma-separated methods (default: %(default)s)")
    w.add_argument("--budget", type=int, default=10, help="trials per task and method (default: %(default)s)")
    w.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite in --output-dir)")
    w.add_argument("--space", default=None, help="JSON (or a JSON file) {parameter: [choices]} overriding the "
                   "paper's search spaces, e.g. '{\"learning_rate\": [5e-5, 1e-4]}'")
    w.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler (default: %(default)s)")
    w.add_argument("--output-dir", required=True, help="trials/, sweep.db, best_configs.json")
    w.add_argument("--jobs", type=int, default=1, help="workers at once on each study, the cores divided between "
                   "them (default: 1)")
    add_training_options(w, cmd_sweep)

    k = sub.add_parser("cost", help="time one update of each method against std (the paper's Table 1)")
    k.add_argument("--model", default=None, help="hub name or folder (default: --config)")
    k.add_argument("--config", choices=("minilm", "bert-base", "bert-large"), default="minilm",
                   help="the embedded MiniLM or a random-init BERT of that size (default: %(default)s)")
    k.add_argument("--batch-size", type=int, default=32)
    k.add_argument("--seq-len", type=int, default=128)
    k.add_argument("--device", default="cpu")
    k.add_argument("--bf16", action="store_true", help="bf16 autocast")
    k.add_argument("--smart-steps", default="1,2", help="SMART step counts to time (default: %(default)s)")
    k.add_argument("--freelb-steps", default="2,3", help="FreeLB step counts to time (default: %(default)s)")
    k.add_argument("--warmup", type=int, default=2)
    k.add_argument("--repeats", type=int, default=5)
    k.add_argument("--json", default=None, help="also write the rows to this file")
    k.add_argument("--regularisers", action="store_true", help="also time R-Drop, NEFTune, NoisyTune, HyPe, "
                   "Child-Tuning (D, F), Mixout and R3F + NoisyTune")
    k.add_argument("--trust-remote-code", action="store_true")
    k.set_defaults(func=cmd_cost)

    x = sub.add_parser("xnli", help="train on English NLI, evaluate zero-shot per language (Table 3)")
    x.add_argument("--task", default="mnli", choices=("mnli",), help="English training task (default: mnli)")
    x.add_argument("--methods", default="std++,r3f", help="comma-separated methods (default: %(default)s)")
    x.add_argument("--eval", action="append", default=[], metavar="LANG=PATH",
                   help="a language's NLI file (repeat the flag for each language)")
    x.add_argument("--eval-columns", action="append", default=[], metavar="[LANG:]premise=COL,hypothesis=COL,label=COL",
                   help="the columns of an --eval file rxf does not recognise: names, or 0-based positions for a file "
                        "without a header; LANG: for one language's file, else every file (repeatable; --columns "
                        "maps the English training files)")
    x.add_argument("--output-dir", required=True, help="runs/<method>/, xnli.json, xnli.md")
    add_training_options(x, cmd_xnli)

    pr = sub.add_parser("probe", help="linear probes on frozen encoders, with CKA drift (Figure 3)")
    pr.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                    help="a checkpoint to probe (repeatable; default: --model as 'pre-trained')")
    pr.add_argument("--runs", action="append", default=[], metavar="DIR",
                    help="probe the best checkpoint of every finished run below DIR (e.g. an rxf compare folder), "
                         "named method/seedN, with mean ± std per method (repeatable)")
    pr.add_argument("--include-base", action="store_true",
                    help="also probe --model (the pre-trained encoder) beside the given checkpoints")
    pr.add_argument("--tasks", default="sst2,rte,mrpc", help="comma-separated GLUE tasks (default: %(default)s)")
    pr.add_argument("--task-data", action="append", default=[], metavar="TASK=DIR",
                    help="data folder for one task, overriding --data-dir (repeatable)")
    pr.add_argument("--reference", default=None, help="model to compare layers with by linear CKA; 'base' = --model")
    pr.add_argument("--cka-samples", type=int, default=256, help="dev examples for CKA (default: %(default)s)")
    pr.add_argument("--pooling", choices=("cls", "mean"), default="cls", help="sentence representation (default: cls)")
    pr.add_argument("--output-dir", required=True, help="probe.json, probe.md, probe.png, cka.png")
    add_spec_options(pr, ("training", "generation", "data"))
    pr.set_defaults(func=cmd_probe)

    for name, helptext in (("chain", "fine-tune along a task chain, probing the source task after each stage (Figure 4)"),
                           ("cycle", "repeat the task chain, probing each task before training on it (Figure 5)")):
        ch = sub.add_parser(name, help=helptext)
        ch.add_argument("--tasks", default="sst2,qnli,qqp,rte", help="the chain, comma-separated (default: %(default)s)")
        ch.add_argument("--methods", default="std,r3f", help="comma-separated methods (default: %(default)s)")
        ch.add_argument("--task-data", action="append", default=[], metavar="TASK=DIR",
                        help="data folder for one task, overriding --data-dir (repeatable)")
        ch.add_argument("--task-epochs", action="append", default=[], metavar="TASK=N",
                        help="epochs of one task's stage, overriding --epochs (repeatable): a small task "
                        "may need several where a large one needs one")
        if name == "cycle":
            ch.add_argument("--cycles", type=int, default=3, help="how often the chain repeats (default: %(default)s)")
        ch.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                        help="sentence representation the probes see (default: cls)")
        ch.add_argument("--output-dir", required=True, help="one folder per method and stage, report, plot")
        if name == "chain":
            ch.add_argument("--jobs", type=int, default=1, help="methods at once, the cores divided between them "
                            "(default: 1)")
        add_training_options(ch, cmd_chain)

    ev = sub.add_parser("evaluate", help="a fine-tuned checkpoint on labelled files: the task's metrics (and GLUE "
                        "diagnostic categories), as JSON and a table")
    _add_inference_options(ev, labelled=True)
    ev.add_argument("--file", action="append", required=True, metavar="PATH",
                    help="a labelled .tsv/.csv/.jsonl file, optionally .gz (repeat the flag for more files)")
    ev.add_argument("--output", required=True, help="the JSON report")
    ev.set_defaults(func=cmd_evaluate)

    pd = sub.add_parser("predict", help="a fine-tuned checkpoint's predictions for an unlabelled file")
    _add_inference_options(pd, labelled=False)
    pd.add_argument("--file", required=True, metavar="PATH", help="a .tsv/.csv/.jsonl file, optionally .gz")
    pd.add_argument("--output", required=True, help="the predictions file, written atomically")
    pd.add_argument("--format", choices=("auto", "glue", "jsonl"), default="auto",
                    help="glue: index<TAB>prediction, the GLUE submission layout; jsonl: one object per row with "
                         "its text, label and probabilities by label name (or score); auto: glue for a GLUE task's "
                         "file with an index column, else jsonl (default: %(default)s)")
    pd.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="offline quickstart: STD vs R3F on a small bundled demo dataset")
    d.add_argument("--output-dir", default="rxf-demo", help="where the demo runs go (default: %(default)s)")
    d.add_argument("--methods", default="std,r3f", help="comma-separated methods (default: %(default)s)")
    d.add_argument("--seed", type=int, default=1, help="seed (default: %(default)s)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, whose --help lists what it takes
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        from rxf.console import quiet_libraries

        quiet_libraries()
        status = args.func(args)
    except RXFError as exc:
        print(f"rxf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Runs stop as if killed: each resumes from its last checkpoint when the command is rerun.
        print(f"rxf {args.command}: interrupted; the same command resumes from the last checkpoints",
              file=sys.stderr)
        return 130
    _leave_process_group()
    return status


def _leave_process_group() -> None:
    """Under torchrun, tear down the process group that the Trainer's Accelerate set up.
    Left for interpreter exit, gloo's threads outlive Python and a rank aborts ("terminate
    called without an active exception"), failing a run that succeeded. Only on success:
    after an error the other ranks may be inside a collective, and tearing down would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
