"""``rxf compare``: tasks × methods × seeds, one ``rxf finetune`` run each, then the report.

Each run has its own folder ``runs/<task>/<method>/seed<seed>/`` with its results.json;
a finished run is skipped when the command is rerun, an interrupted one resumes.
Per-method settings found by ``rxf sweep`` (its ``best_configs.json``) can be passed in,
so that every method is compared at the configuration its own equal-budget search chose
(the protocol of Aghajanyan et al. 2021, Section 5).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rxf.errors import DataError, OptionError
from rxf.experiments.parallel import run_jobs
from rxf.experiments.report import write_report
from rxf.finetune import RESULTS, FinetuneSpec, run_finetune
from rxf.methods.options import MethodOptions, check_methods, method_option_names

SPEC_OVERRIDES = ("learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay")


def load_best_configs(path: str | Path | None) -> dict:
    """{task: {method: {"params": {...}}}} as written by ``rxf sweep``."""
    if path is None:
        return {}
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OptionError(f"--configs: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def configure(base: FinetuneSpec, options: MethodOptions, task: str, method: str, seed: int, run_dir: Path,
              best_configs: dict) -> tuple[FinetuneSpec, MethodOptions]:
    """The spec and options of one run: the shared settings, then the method, then the
    parameters the sweep chose for this task and method."""
    params = best_configs.get(task, {}).get(method, {}).get("params", {})
    unknown = set(params) - set(SPEC_OVERRIDES) - set(method_option_names())
    if unknown:
        raise OptionError(f"--configs: unknown parameter(s) {', '.join(sorted(unknown))} for {task}/{method}")
    spec = dataclasses.replace(base, task=task, seed=seed, output_dir=str(run_dir),
                               **{k: v for k, v in params.items() if k in SPEC_OVERRIDES})
    opts = dataclasses.replace(options, method=method,
                               **{k: v for k, v in params.items() if k in method_option_names()})
    return spec, opts


def run_compare(
    out: Path, tasks: list[str], methods: list[str], seeds: list[int], base: FinetuneSpec,
    options: MethodOptions, best_configs: dict | None = None, jobs: int = 1,
) -> dict:
    """Run (or skip, when finished) every task × method × seed, ``jobs`` at a time, then
    write the report in ``out``. Returns the report's summary."""
    check_methods(methods)
    grid = [(t, m, s) for t in tasks for m in methods for s in seeds]
    planned = [configure(base, options, t, m, s, Path(out) / "runs" / t / m / f"seed{s}", best_configs or {})
               for t, m, s in grid]
    for spec, opts in planned:  # every option checked before the first run starts
        opts.validate()
    calls = []
    for i, (spec, opts) in enumerate(planned, start=1):
        done = (Path(spec.output_dir) / RESULTS).is_file()
        print(f"rxf compare [{i}/{len(planned)}] {spec.task} {opts.method} seed {spec.seed}: "
              f"{'finished, checking it is this run' if done else 'to run'}", flush=True)
        # Always through run_finetune: a finished folder is returned only if it holds this
        # very run (same options and data), never a stale one. Several jobs share one
        # terminal: no progress bars then.
        calls.append((dataclasses.replace(spec, progress=spec.progress and jobs == 1), opts))
    run_jobs(run_finetune, calls, jobs)
    return write_report(Path(out) / "runs", out)
