"""Tables and plots from folders of ``results.json`` files (one per run), so runs made on
several machines or into several output folders merge.

- ``report.md``: the paper's Table 2 layout (methods × {max, median} over seeds, one
  column per task), then per task the max, median, mean ± std, min and number of seeds,
  and the median wall-clock seconds to the best checkpoint (Figure 1's quantity).
- ``violin_<task>.png``: the seed distribution of each method (Figure 2).
- ``seconds_to_best.png``: seconds to the best checkpoint per method (Figure 1).
- ``report.json``: the same numbers, machine-readable.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

from rxf.errors import DataError, OptionError
from rxf.finetune import NOT_DEFINING, RESULTS, RUN_RECORD
from rxf.jsonio import write_json_atomic
from rxf.methods.options import MethodOptions, method_option_names
from rxf.spec import FinetuneSpec

METHOD_ORDER = ("std", "std++", "r3f", "r4f", "smart", "freelb", "rdrop", "neftune", "noisytune", "hype", "childtune",
                "mixout")


_REQUIRED = {"task": str, "method": str, "seed": int, "main_metric": str, "best": dict}


def collect(folders: Path | list[Path], paths: list[Path] | None = None) -> list[dict]:
    """Every ``results.json`` below each of ``folders`` (sorted by path within a folder), or
    the files ``paths``, each with its ``run.json`` beside it when there is one (``_record``)."""
    if paths is None:
        found: dict[Path, Path] = {}  # a folder given twice, or inside another: each run once
        for folder in [folders] if isinstance(folders, (str, Path)) else folders:
            if not Path(folder).is_dir():
                raise DataError(f"{folder}: not found (expected a folder of runs)")
            for path in sorted(Path(folder).rglob(RESULTS)):
                found.setdefault(path.resolve(), path)
        paths = list(found.values())
    runs = []
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(run, dict) or any(not isinstance(run.get(k), t) or isinstance(run.get(k), bool)
                                            for k, t in _REQUIRED.items()):
            raise DataError(f"{path}: not the results.json of an rxf run (needs "
                            f"{', '.join(f'{k} ({t.__name__})' for k, t in _REQUIRED.items())})")
        record = Path(path).with_name(RUN_RECORD)
        try:
            run["_record"] = json.loads(record.read_text()) if record.is_file() else None
        except json.JSONDecodeError as exc:
            raise DataError(f"{record}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        run["_path"] = str(path)
        runs.append(run)
    return runs


def main_value(run: dict) -> float:
    """The run's best dev score on its task's main metric (e.g. dev/accuracy)."""
    split, metric = run["main_metric"].split("/")
    return run["best"][split][metric]


# Spec fields that may differ between the seeds of one task and method: the seed, where and
# how a run reported, and where its model and data lay (runs merged from several machines
# read them from other paths; the number of examples is compared instead).
_FREE_BETWEEN_SEEDS = {*NOT_DEFINING, "seed", "model", "data_dir", "train_file", "dev_file"}


def _settings(run: dict) -> dict:
    """What one seed of a task and method shares with the others: the defining options
    (those this rxf knows; one that a run's older rxf did not have yet counts at its
    default, the behaviour that run had, as when a run folder is resumed), the size of
    each data split, the number of processes and, from ``run.json`` where it lies beside
    the results, the digests of the model's files and of the data's content."""
    spec_defaults = dataclasses.asdict(FinetuneSpec())
    option_defaults = dataclasses.asdict(MethodOptions())
    recorded_spec, recorded_options = run.get("spec", {}), run.get("config", {})
    spec = {k: recorded_spec.get(k, default) for k, default in spec_defaults.items() if k not in _FREE_BETWEEN_SEEDS}
    options = {k: recorded_options.get(k, option_defaults.get(k)) for k in method_option_names()}
    examples = {split: d.get("examples") for split, d in run.get("data", {}).items() if isinstance(d, dict)}
    record = run.get("_record") or {}
    # The batch is per process: runs under torchrun with other process counts are other
    # configurations. A run that recorded none ran in one (as check_run_folder assumes).
    spec["processes"] = record.get("processes") or run.get("hardware", {}).get("processes") or 1
    content = {"model_files": record.get("model_files"), **{f"data.{k}": v for k, v in record.get("data", {}).items()}}
    return {"spec": spec, "options": options, "examples": examples,
            "content": {k: v for k, v in content.items() if v is not None}}


def check_group(task: str, method: str, group: list[dict]) -> None:
    """Refuse a task and method whose runs are not seeds of one configuration: a seed found
    twice (folders copied together), or runs at other settings (another learning rate, an
    older sweep's choice). Their max and median would be reported as one method's, silently."""
    first_of_seed: dict[int, dict] = {}
    for run in group:
        twin = first_of_seed.setdefault(run["seed"], run)
        if twin is not run:
            raise DataError(f"{task}/{method}: seed {run['seed']} twice, in {twin['_path']} and {run['_path']}; "
                            f"report them from separate folders")
    reference = _settings(group[0])
    for run in group[1:]:
        settings = _settings(run)
        differs = [f"{section}.{key} ({reference[section].get(key)!r} there, {value.get(key)!r} here)"
                   for section, value in settings.items()
                   # A digest only one of the two runs recorded cannot be compared.
                   for key in sorted(set(value) & set(reference[section]) if section == "content"
                                     else set(value) | set(reference[section]))
                   if value.get(key) != reference[section].get(key)]
        if differs:
            raise DataError(f"{run['_path']}: {task}/{method} seed {run['seed']} differs from seed "
                            f"{group[0]['seed']} ({group[0]['_path']}) in {'; '.join(differs[:4])}"
                            f"{' ...' if len(differs) > 4 else ''}: not seeds of one configuration; "
                            f"report them from separate folders")


def summarise(runs: list[dict]) -> dict:
    """{task: {method: stats}} with scores over seeds and seconds to the best checkpoint."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        groups[run["task"]][run["method"]].append(run)
    summary = {}
    for task, by_method in sorted(groups.items()):
        summary[task] = {}
        for method in sorted(by_method, key=_method_key):
            group = sorted(by_method[method], key=lambda r: r["seed"])
            check_group(task, method, group)
            scores = [main_value(r) for r in group]
            seconds = [r["seconds_to_best"] for r in group if r.get("seconds_to_best") is not None]
            # Figure 1's seconds to best = updates to best x seconds per update: the first is
            # the method's, the second also the machine's (and whatever else ran on it).
            best_updates = [r["best_step"] for r in group if r.get("best_step") is not None]
            per_update = [r["train_seconds"] / r["updates"] for r in group if r.get("train_seconds") and r.get("updates")]
            summary[task][method] = {
                "metric": group[0]["main_metric"],
                "seeds": [r["seed"] for r in group],
                "scores": scores,
                "n": len(scores),
                "max": max(scores),
                "median": statistics.median(scores),
                "mean": statistics.fmean(scores),
                "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "min": min(scores),
                "seconds_to_best": seconds,
                "median_seconds_to_best": statistics.median(seconds) if seconds else None,
                "median_best_update": statistics.median(best_updates) if best_updates else None,
                "median_seconds_per_update": statistics.median(per_update) if per_update else None,
            }
    return summary


def _method_key(method: str):
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def markdown(summary: dict) -> str:
    tasks = list(summary)
    methods = sorted({m for t in summary.values() for m in t}, key=_method_key)
    lines = ["# Results", "", "Best dev score per run (×100), over seeds — the layout of Table 2 of",
             "Aghajanyan et al. (2021).", "",
             "| method | " + " | ".join(f"{t} ({summary[t][next(iter(summary[t]))]['metric']})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for stat in ("max", "median"):
        for method in methods:
            cells = [f"{100 * summary[t][method][stat]:.1f}" if method in summary[t] else "–" for t in tasks]
            lines.append(f"| {method} {stat} | " + " | ".join(cells) + " |")
    for task in tasks:
        lines += ["", f"## {task}", "",
                  "| method | seeds | max | median | mean ± std | min | median s to best | median best update "
                  "| median s per update |", "|---|---|---|---|---|---|---|---|---|"]
        for method, s in summary[task].items():
            secs, update, per_update = (
                f"{s[key]:{form}}" if s.get(key) is not None else "–" for key, form in (
                    ("median_seconds_to_best", ".0f"), ("median_best_update", ".0f"), ("median_seconds_per_update", ".2f")))
            lines.append(f"| {method} | {s['n']} | {100 * s['max']:.1f} | {100 * s['median']:.1f} | "
                         f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {100 * s['min']:.1f} | {secs} | {update} "
                         f"| {per_update} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> list[Path]:
    """Violin plots of scores per task and of seconds to the best checkpoint."""
    from rxf.plotting import plt, save_figure

    paths = []
    for task, by_method in summary.items():
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(by_method), 3.6))
        _violins(ax, [[100 * v for v in s["scores"]] for s in by_method.values()], list(by_method))
        ax.set_title(f"{task}: best dev score over seeds")
        ax.set_ylabel(f"{next(iter(by_method.values()))['metric']} ×100")
        paths.append(save_figure(fig, out / f"violin_{task}.png"))

    tasks = [t for t in summary if any(s["seconds_to_best"] for s in summary[t].values())]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(0.5 + 3.4 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            methods = [m for m, s in summary[task].items() if s["seconds_to_best"]]
            _violins(ax, [summary[task][m]["seconds_to_best"] for m in methods], methods)
            ax.set_title(f"{task}: seconds to best checkpoint")
            ax.set_ylabel("seconds")
        paths.append(save_figure(fig, out / "seconds_to_best.png"))
    return paths


def _violins(ax, data: list[list[float]], labels: list[str]) -> None:
    positions = list(range(1, len(data) + 1))
    spread = [(p, d) for p, d in zip(positions, data) if len(d) > 1 and max(d) > min(d)]
    if spread:
        ax.violinplot([d for _, d in spread], positions=[p for p, _ in spread], showmedians=True)
    for p, d in zip(positions, data):  # every seed as a point: a violin alone hides small samples
        ax.scatter([p] * len(d), d, s=12, color="black", zorder=3)
    ax.set_xticks(positions, labels)


def write_report(runs_folder: Path | list[Path], out: Path | None = None, paths: list[Path] | None = None,
                 seeds: set[int] | None = None) -> dict:
    """Collect the runs below ``runs_folder`` — one folder, or several pooled (seeds run
    into other output folders or on other machines; ``check_group`` still refuses a seed
    found twice) — or only the ``results.json`` files ``paths``, only the ``seeds`` given,
    and write report.md, report.json and the plots into ``out`` (default: the one
    ``runs_folder``). Returns the summary."""
    folders = [runs_folder] if isinstance(runs_folder, (str, Path)) else list(runs_folder)
    if out is None and len(folders) != 1:
        raise OptionError("--output-dir is needed to report several folders of runs (--runs given more than once)")
    out = Path(out or folders[0])
    runs = [run for run in collect(folders, paths) if seeds is None or run["seed"] in seeds]
    if not runs:
        raise DataError(f"{', '.join(map(str, folders))}: no {RESULTS} files found below "
                        f"{'it' if len(folders) == 1 else 'them'}"
                        f"{' for seeds ' + ', '.join(map(str, sorted(seeds))) if seeds else ''}")
    summary = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    # Plots first: report.md and report.json are replaced only once every plot is drawn.
    # A plot of a task this report lacks (an earlier report into this folder) is removed.
    drawn = set(plot(summary, out))
    for old in {*out.glob("violin_*.png"), out / "seconds_to_best.png"} - drawn:
        old.unlink(missing_ok=True)
    tmp = out / "report.md.tmp"
    tmp.write_text(markdown(summary))
    tmp.replace(out / "report.md")
    write_json_atomic(out / "report.json", {"runs": [r["_path"] for r in runs], "summary": summary})
    return summary
