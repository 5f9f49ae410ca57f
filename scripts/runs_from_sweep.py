"""Copy each sweep trial that ``rxf sweep`` chose into an ``rxf compare`` folder as that
seed's run, so that the comparison does not train it again.

A sweep trials every configuration on one seed; the chosen one *is* the comparison's run
for that seed (same options, same data), so its ``run.json`` and ``results.json`` are
copied to ``<compare>/runs/<task>/<method>/seed<seed>/``. ``rxf compare`` then checks the
copied ``run.json`` against the run it would start and refuses the folder if anything
differs, so a copy can never stand in for another run. Checkpoints are not copied (the
report needs only ``results.json``; ``rxf probe --runs`` finds no ``best/`` there). The
comparison's ``--seeds`` must include the sweep's ``--seed`` (rxf's default is 42) for the
copy to be used: ``rxf compare`` reports only the runs it was asked for.

    python scripts/runs_from_sweep.py runs/table2-sweep-bc runs/table2 --tasks cola
"""

import argparse
import json
import shutil
from pathlib import Path


def chosen_trials(sweep: Path, tasks: list[str] | None):
    """(task, method, trial folder) of every configuration best_configs.json names."""
    try:
        best = json.loads((sweep / "best_configs.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{sweep / 'best_configs.json'}: cannot be read ({exc})") from None
    for task, methods in best.items():
        if tasks and task not in tasks:
            continue
        for method, entry in methods.items():
            matches = []
            for record in sorted((sweep / "trials" / task / method).glob("*/run.json")):
                run = json.loads(record.read_text())
                values = {**run["spec"], **run["options"]}
                if all(values.get(k) == v for k, v in entry["params"].items()) and (record.parent / "results.json").is_file():
                    matches.append(record.parent)
            if len(matches) != 1:
                raise SystemExit(f"{sweep}: {task}/{method}: {len(matches)} finished trials match {entry['params']}")
            yield task, method, matches[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep's --output-dir")
    parser.add_argument("compare", type=Path, help="the comparison's --output-dir")
    parser.add_argument("--tasks", default="", help="comma-separated tasks (default: all the sweep chose for)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    chosen = list(chosen_trials(args.sweep, tasks))
    if not chosen:
        raise SystemExit(f"{args.sweep}: best_configs.json names no configuration"
                         f"{' for ' + ', '.join(tasks) if tasks else ''}")
    for task, method, trial in chosen:
        seed = json.loads((trial / "run.json").read_text())["spec"]["seed"]
        target = args.compare / "runs" / task / method / f"seed{seed}"
        if (target / "results.json").is_file():
            print(f"{target}: already holds a finished run, left as it is")
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in ("run.json", "results.json"):
            shutil.copy2(trial / name, target / name)
        print(f"{task} {method}: the sweep's trial {trial.name} is seed {seed}'s run -> {target}")


if __name__ == "__main__":
    main()
