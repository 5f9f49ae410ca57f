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
from rxf.methods.options import METHODS, MethodOptions, check_methods, method_option_names
from rxf.spec import validate_spec

SPEC_OVERRIDES = ("learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay")


def load_best_configs(paths: str | Path | list | None) -> dict | None:
    """{task: {method: {"params": {...}}}} as written by ``rxf sweep``, from one file or
    several (sweeps of different methods, e.g. one per optimiser), merged; None without a
    file. A task and method that two files configure differently is refused: which one a
    run used would be silent. Each entry is checked (a known method, a ``params`` object of
    known parameters with values of their type) before anything trains."""
    if paths is None:
        return None
    merged: dict = {}
    origin: dict[tuple[str, str], Path] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        try:
            configs = json.loads(path.read_text())
        except FileNotFoundError:
            raise OptionError(f"--configs: {path} not found") from None
        except OSError as exc:
            raise OptionError(f"--configs: {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(configs, dict) or not all(isinstance(methods, dict) for methods in configs.values()):
            raise DataError(f"{path}: expected {{task: {{method: {{\"params\": ...}}}}}} as rxf sweep writes it")
        for task, methods in configs.items():
            for method, entry in methods.items():
                _check_entry(path, task, method, entry)
                known = merged.setdefault(task, {}).get(method)
                if known is not None and known["params"] != entry["params"]:
                    raise OptionError(f"--configs: {task}/{method} is configured differently in "
                                      f"{origin[task, method]} and {path}")
                merged[task][method] = entry
                origin[task, method] = path
    return merged


def _check_entry(path: Path, task: str, method: str, entry) -> None:
    where = f"--configs: {path}: {task}/{method}"
    if method not in METHODS:
        raise OptionError(f"{where}: unknown method; choose from {', '.join(METHODS)}")
    if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
        raise OptionError(f"{where}: expected {{\"params\": {{parameter: value}}}}")
    fields = {f.name: f for f in (*dataclasses.fields(FinetuneSpec), *dataclasses.fields(MethodOptions))}
    for name, value in entry["params"].items():
        if name not in SPEC_OVERRIDES and (name not in method_option_names() or name in ("method", "extras")):
            raise OptionError(f"{where}: unknown parameter {name!r}")
        if not _of_type(value, str(fields[name].type)):
            raise OptionError(f"{where}: {name} must be {fields[name].type}, got {value!r}")


def _of_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a dataclass field annotated ``float``, ``int | None``, ..."""
    kinds = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,), "None": (type(None),)}
    allowed = tuple(k for name in annotation.split("|") for k in kinds.get(name.strip(), ()))
    numeric = not isinstance(value, bool) or "bool" in annotation  # JSON true is not the number 1
    return isinstance(value, allowed) and numeric


def configure(base: FinetuneSpec, options: MethodOptions, task: str, method: str, seed: int, run_dir: Path,
              best_configs: dict) -> tuple[FinetuneSpec, MethodOptions]:
    """The spec and options of one run: the shared settings, then the method, then the
    parameters the sweep chose for this task and method (checked: a bad value is named
    with the task and method whose configuration holds it)."""
    params = best_configs.get(task, {}).get(method, {}).get("params", {})
    unknown = set(params) - set(SPEC_OVERRIDES) - set(method_option_names())
    if unknown:
        raise OptionError(f"--configs: unknown parameter(s) {', '.join(sorted(unknown))} for {task}/{method}")
    spec = dataclasses.replace(base, task=task, seed=seed, output_dir=str(run_dir),
                               **{k: v for k, v in params.items() if k in SPEC_OVERRIDES})
    opts = dataclasses.replace(options, method=method,
                               **{k: v for k, v in params.items() if k in method_option_names()})
    try:
        validate_spec(spec)
        opts.validate()
    except OptionError as exc:
        raise OptionError(f"--configs {task}/{method}: {exc}" if params else str(exc)) from None
    return spec, opts


def run_compare(
    out: Path, tasks: list[str], methods: list[str], seeds: list[int], base: FinetuneSpec,
    options: MethodOptions, best_configs: dict | None = None, jobs: int = 1,
) -> dict:
    """Run (or skip, when finished) every task × method × seed, ``jobs`` at a time, then
    write the report in ``out``. Returns the report's summary."""
    check_methods(methods)
    grid = [(t, m, s) for t in tasks for m in methods for s in seeds]
    # Every run's options checked (configure validates) before the first run starts.
    planned = [configure(base, options, t, m, s, Path(out) / "runs" / t / m / f"seed{s}", best_configs or {})
               for t, m, s in grid]
    if best_configs is not None:  # a method the sweeps left out runs at the shared settings: say so, once
        for task, method in dict.fromkeys((t, m) for t, m, _ in grid):
            if method not in best_configs.get(task, {}):
                print(f"rxf compare: --configs has no configuration for {task}/{method}; "
                      f"it runs at the command's own settings", flush=True)
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
    # The report holds this command's runs only: other seeds or methods left in the folder
    # (an earlier command's, a copied sweep trial) would silently join its max and median.
    return write_report(Path(out) / "runs", out, [Path(spec.output_dir) / RESULTS for spec, _ in planned])
