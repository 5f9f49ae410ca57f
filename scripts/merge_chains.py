"""Pool ``rxf chain`` runs of several seeds (one output folder per seed) into one report:
per method and stage, the source task's probe (mean ± std over seeds) and the dev score
each stage reached on its own task — the evidence that every stage learnt something
(Aghajanyan et al. 2021, Figure 4, averages its chains over seeds the same way).

    python scripts/merge_chains.py runs/fig4-seed1 runs/fig4-seed2 runs/fig4-seed3 \\
        --output-dir docs/results/fig4

It reads only JSON (each stage's ``results.json`` and the probes stored beside the stages:
``METHOD/stageNN-TASK/results.json``, ``METHOD/stageNN-TASK.probe-SOURCE.json``), so it runs
on committed results without checkpoints, and it finds every method's chain in a folder
whether the methods ran in one ``rxf chain`` or one process each (whose ``chain.json`` holds
only the last). ``--methods`` picks and orders them, e.g. the methods every seed has. One
folder is enough (a single seed's report, with its stage scores). Folders pool only when
nothing says they were run differently: the same tasks, methods and stages; probes made on
the same examples, pooling and length; stages fine-tuned with the same settings and method
options (the seed and the paths aside); and a different seed in each folder — one seed twice
would count one chain twice.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from rxf.jsonio import replace_folder_whole, write_json_atomic
from rxf.methods.options import METHODS

REPORT_FILES = {"chain.json", "chain.md", "chain.png"}
STAGE_FOLDER = re.compile(r"stage(\d{2})-(.+)")
PRETRAINED_PROBE = "stage00-pretrained.probe-"
# Fields of a stage's spec and training configuration that differ between the seeds of one
# study by construction (the seed, and paths inside each seed's folder).
PER_RUN_FIELDS = {"seed", "data_seed", "output_dir", "logging_dir", "run_name", "model", "progress", "overwrite"}


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise SystemExit(f"{path}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a JSON object")
    return data


def stage_score(results: dict) -> float | None:
    """The best checkpoint's main metric (``main_metric`` is a path such as ``dev/accuracy``)."""
    value = results.get("best")
    for key in results.get("main_metric", "").split("/"):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON's true is not a score


def read_probe(path: Path, source: str) -> dict:
    probe = read_json(path)
    score, identity = probe.get("score"), probe.get("identity")
    if (probe.get("task") != source or not is_number(score)
            or not isinstance(identity, dict) or not isinstance(identity.get("weights"), str)):
        raise SystemExit(f"{path}: not a probe of {source} (it needs \"task\": \"{source}\", a numeric score and "
                         "the identity of the weights it probed)")
    return probe


def read_chain(root: Path) -> tuple[list[str], str, list[dict]]:
    """One method's chain in ``root`` (``runs/fig4-seed1/r3f``): its tasks in stage order, the
    source task, and the source task's probes, before the first stage and after each. Each
    probe must be of the weights the next stage started from (its ``run.json`` says which):
    a probe copied or left over from another run is refused, not reported."""
    pretrained = sorted(root.glob(PRETRAINED_PROBE + "*.json"))
    if len(pretrained) != 1:
        raise SystemExit(f"{root}: expected one probe of the pre-trained encoder ({PRETRAINED_PROBE}TASK.json), "
                         f"found {len(pretrained)}")
    source = pretrained[0].name[len(PRETRAINED_PROBE):-len(".json")]
    stages = sorted(p for p in root.iterdir() if p.is_dir() and STAGE_FOLDER.fullmatch(p.name))
    numbers, tasks = zip(*(STAGE_FOLDER.fullmatch(p.name).groups() for p in stages)) if stages else ((), ())
    if not stages or [int(n) for n in numbers] != list(range(1, len(stages) + 1)):
        raise SystemExit(f"{root}: stage folders {[p.name for p in stages]} are not stage01-TASK, stage02-TASK, ... "
                         "without a gap")
    paths = [pretrained[0], *(stage.with_name(f"{stage.name}.probe-{source}.json") for stage in stages)]
    probes = [read_probe(path, source) for path in paths]
    for stage, before, path in zip(stages, probes, paths):
        started = read_json(stage / "run.json").get("model_files")
        if started != before["identity"]["weights"]:
            raise SystemExit(f"{stage}/run.json: the stage started from weights {started}, but {path.name} probed "
                             f"{before['identity']['weights']}: the probe is not of this chain's encoder")
    weights = [probe["identity"]["weights"] for probe in probes]
    if len(set(weights)) < len(weights):
        raise SystemExit(f"{root}: two of its probes are of the same weights ({weights}): a probe was copied")
    labels = ["pre-trained", *(f"after {task}" for task in tasks)]
    return list(tasks), source, [{**probe, "stage": label} for probe, label in zip(probes, labels)]


def method_order(method: str) -> tuple:
    return (METHODS.index(method) if method in METHODS else len(METHODS), method)


def load_seed(folder: Path, methods: list[str] | None = None) -> dict:
    """One seed's chains (``methods``, default every method with a chain in ``folder``):
    {"seed", "tasks", "source", "methods": {method: [stage rows]}, "settings", ...}."""
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not a folder")
    # A method folder is one with a pre-trained probe or a stage: one without the probe is
    # refused below, not left out of the report.
    found = sorted((p.name for p in folder.iterdir() if p.is_dir() and (
        any(p.glob(PRETRAINED_PROBE + "*.json")) or any(STAGE_FOLDER.fullmatch(q.name) for q in p.iterdir()))),
        key=method_order)
    if not found:
        raise SystemExit(f"{folder}: holds no rxf chain (no METHOD/{PRETRAINED_PROBE}TASK.json)")
    missing = [m for m in methods or [] if m not in found]
    if missing:
        raise SystemExit(f"{folder}: has no chain of {', '.join(missing)} (it has {', '.join(found)})")
    chain = {"methods": {}}
    for method in methods or found:
        tasks, source, probes = read_chain(folder / method)
        if chain.setdefault("tasks", tasks) != tasks or chain.setdefault("source", source) != source:
            raise SystemExit(f"{folder}: its methods' chains differ in tasks ({chain['tasks']} against {tasks} "
                             f"of {method})")
        chain["methods"][method] = probes
    seeds, identities, settings, rows = set(), set(), {}, {}
    bases = {method: stages[0]["identity"]["weights"] for method, stages in chain["methods"].items()}
    if len(set(bases.values())) > 1:
        raise SystemExit(f"{folder}: its methods' chains start from different pre-trained weights ({bases})")
    for method, stages in chain["methods"].items():
        rows[method] = []
        for index, stage in enumerate(stages):
            identity = stage["identity"]  # a dict: read_probe checked it
            seeds.add(identity.get("seed"))
            identities.add(json.dumps({k: v for k, v in identity.items() if k not in ("weights", "seed")},
                                      sort_keys=True))
            row = {"stage": stage["stage"], "probe": stage["score"], "majority": stage.get("majority"),
                   "task_score": None}
            if index > 0:
                task = chain["tasks"][index - 1]
                results_path = folder / method / f"stage{index:02d}-{task}" / "results.json"
                results = read_json(results_path)
                if results.get("task") != task or results.get("method") != method:
                    raise SystemExit(f"{results_path}: a {results.get('method')} run on {results.get('task')}, "
                                     f"not the {method} stage on {task}")
                seeds.add(results.get("seed"))
                row["task_score"] = stage_score(results)
                row["main_metric"] = results.get("main_metric")
                if not is_number(row["task_score"]):
                    raise SystemExit(f"{results_path}: no best score for its main metric {row['main_metric']!r}")
                settings[f"{method} {task}"] = {part: {k: v for k, v in (results.get(part) or {}).items()
                                                       if k not in PER_RUN_FIELDS} for part in ("spec", "config")}
                settings[f"{method} {task}"]["main_metric"] = row["main_metric"]
            rows[method].append(row)
    if len(seeds) != 1 or None in seeds:
        raise SystemExit(f"{folder}: its stages and probes do not share one seed ({sorted(map(str, seeds))})")
    if len(identities) != 1:
        raise SystemExit(f"{folder}: its probes were not made on the same examples, pooling and length")
    return {"folder": str(folder), "seed": seeds.pop(), "tasks": chain["tasks"], "source": chain["source"],
            "methods": rows, "probe_identity": identities.pop(), "settings": settings,
            "base_weights": next(iter(bases.values()))}


def check_alike(runs: list[dict]) -> None:
    first = runs[0]
    for run in runs[1:]:
        def refuse(what: str):
            raise SystemExit(f"{first['folder']} and {run['folder']} differ in {what}: they were not run "
                             "alike, so their chains cannot be pooled")

        if (run["tasks"], run["source"]) != (first["tasks"], first["source"]):
            refuse(f"tasks ({first['tasks']} against {run['tasks']})")
        if list(run["methods"]) != list(first["methods"]):
            refuse(f"methods ({list(first['methods'])} against {list(run['methods'])})")
        if run["base_weights"] != first["base_weights"]:
            refuse(f"the pre-trained weights their chains start from ({first['base_weights']} against "
                   f"{run['base_weights']})")
        if run["probe_identity"] != first["probe_identity"]:
            refuse(f"the probes' examples, pooling or length ({first['probe_identity']} against "
                   f"{run['probe_identity']})")
        for stage, setting in first["settings"].items():
            if run["settings"][stage] != setting:
                refuse(f"the {stage} stage's fine-tuning settings")
    seen = {}
    for run in runs:
        if run["seed"] in seen:
            raise SystemExit(f"{seen[run['seed']]} and {run['folder']} are both seed {run['seed']}: one chain would "
                             "count twice")
        seen[run["seed"]] = run["folder"]


def spread(values: list) -> dict:
    """Mean, standard deviation (0 for one value) and the values, or None where any is missing."""
    if any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def merge(runs: list[dict]) -> dict:
    check_alike(runs)
    first = runs[0]
    methods = {}
    for method, stages in first["methods"].items():
        methods[method] = []
        for index, stage in enumerate(stages):
            row = {"stage": stage["stage"], "majority": stage["majority"],
                   "probe": spread([run["methods"][method][index]["probe"] for run in runs])}
            if index > 0:
                row["main_metric"] = stage["main_metric"]
                row["task_score"] = spread([run["methods"][method][index]["task_score"] for run in runs])
            methods[method].append(row)
    return {"tasks": first["tasks"], "source": first["source"], "seeds": [run["seed"] for run in runs],
            "merged_from": [run["folder"] for run in runs], "methods": methods}


def cell(value: dict | None) -> str:
    if value is None:
        return "–"
    if len(value["values"]) == 1:
        return f"{100 * value['mean']:.1f}"
    return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"


def markdown(report: dict) -> str:
    labels = [row["stage"] for row in next(iter(report["methods"].values()))]
    seeds = ", ".join(str(s) for s in report["seeds"])
    majority = next(iter(report["methods"].values()))[0]["majority"]
    baseline = "" if majority is None else f"; majority class {100 * majority:.1f}"
    lines = [f"Probe of the source task {report['source']} before the chain and after each stage "
             f"(dev ×100, mean ± std over seeds {seeds}{baseline})", "",
             "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for method, rows in report["methods"].items():
        lines.append(f"| {method} | " + " | ".join(cell(row["probe"]) for row in rows) + " |")
    metrics = ", ".join(f"{t} {row['main_metric'].split('/')[-1]}"
                        for t, row in zip(report["tasks"], next(iter(report["methods"].values()))[1:]))
    lines += ["", f"Each stage's best dev score on its own task (×100; {metrics})", "",
              "| method | " + " | ".join(report["tasks"]) + " |", "|---|" + "---|" * len(report["tasks"])]
    for method, rows in report["methods"].items():
        lines.append(f"| {method} | " + " | ".join(cell(row["task_score"]) for row in rows[1:]) + " |")
    return "\n".join(lines) + "\n"


def seed_words(seeds: list) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds"


def write_report(folder: Path, report: dict) -> None:
    from rxf.probing.plots import plot_lines  # matplotlib: a second of start-up that a refusal does not need

    folder.mkdir(parents=True)
    write_json_atomic(folder / "chain.json", report)
    (folder / "chain.md").write_text(markdown(report))
    labels = [row["stage"] for row in next(iter(report["methods"].values()))]
    plot_lines({m: [row["probe"]["mean"] for row in rows] for m, rows in report["methods"].items()}, labels,
               folder / "chain.png", f"{report['source']} probe along the chain ({seed_words(report['seeds'])})",
               f"{report['source']} probe dev score ×100",
               errors={m: [row["probe"]["std"] for row in rows] for m, rows in report["methods"].items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chains", nargs="+", type=Path, help="rxf chain output folders, one per seed")
    parser.add_argument("--output-dir", required=True, type=Path, help="chain.json, chain.md, chain.png")
    parser.add_argument("--methods", help="the methods to pool, comma-separated, in the report's order (default: "
                                          "every method with a chain in the folders)")
    args = parser.parse_args(argv)
    resolved = [folder.resolve() for folder in args.chains]
    if len(set(resolved)) < len(resolved):
        parser.error("a chain folder is given twice")
    if any(args.output_dir.resolve().is_relative_to(folder) for folder in resolved):
        parser.error(f"--output-dir {args.output_dir} is one of the chains to pool or inside one; choose another folder")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods is not None and (not methods or len(set(methods)) < len(methods)):
        parser.error(f"--methods {args.methods!r}: name each method once, comma-separated")
    report = merge([load_seed(folder, methods) for folder in args.chains])
    replace_folder_whole(args.output_dir, REPORT_FILES, lambda folder: write_report(folder, report),
                         "a chain report")
    print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
