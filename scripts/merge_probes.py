"""Merge ``rxf probe`` reports made at different times into one, with each method's mean
± std over all its seeds — e.g. seed 1 probed in one session, seeds 2–3 in the next.

Reports merge only when nothing says they were probed differently: the same tasks, the
same training/dev example counts and majority baselines per task, the same settings
(pooling, maximum length, sample counts, seed) where the reports record them, the same CKA
example count, and — the fingerprint of all of it, data and probe code included —
identical results (to 1e-4, relative) for every encoder that more than one report probed. At least
one encoder must be common to all the reports (probe the pre-trained one in each with
``--include-base``); without one, nothing shows they were probed alike. One checkpoint
under two names would count twice as a seed, so it is refused.

    python scripts/merge_probes.py docs/results/fig3/probe-seed1 runs/fig3-probe-seeds23 \\
        --output-dir docs/results/fig3/probe

The output folder is written whole or not at all (built beside it, then swapped in), and
may hold nothing but an earlier probe report.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

from rxf.jsonio import replace_folder_whole
from rxf.probing.report import group_scores, probe_table, write_probe_report

# Per-task facts of the data a probe saw: equal in every report of one study.
DATA_FACTS = ("train_examples", "dev_examples", "majority", "main_metric")
REPORT_FILES = {"probe.json", "probe.md", "probe.png", "cka.png"}


def load(folder: Path) -> dict:
    path = folder / "probe.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise SystemExit(f"{path}: cannot be read ({exc})") from None
    if not isinstance(report, dict) or not {"tasks", "probes", "checkpoints"} <= set(report):
        raise SystemExit(f"{path}: not an rxf probe report (no tasks, probes or checkpoints)")
    if not report["tasks"] or not report["probes"]:
        raise SystemExit(f"{path}: the report probes no task or no encoder")
    for name, by_task in report["probes"].items():
        if set(by_task) != set(report["tasks"]) or (
                "drift" in report and name not in report["drift"].get("checkpoints", {})):
            raise SystemExit(f"{path}: {name} lacks a task's probe or its CKA drift: not a whole rxf probe report")
    return report


def data_facts(report: dict, path: Path) -> dict:
    """{task: facts} shared by every probe of the report (they are properties of the data)."""
    facts = {}
    for name, by_task in report["probes"].items():
        for task in report["tasks"]:
            these = {fact: by_task[task].get(fact) for fact in DATA_FACTS}
            if facts.setdefault(task, these) != these:
                raise SystemExit(f"{path / 'probe.json'}: {name}'s {task} data differs from the report's other "
                                 f"encoders ({these} against {facts[task]})")
    return facts


def check_alike(a: dict, b: dict, a_path: Path, b_path: Path) -> None:
    """Refuse two reports that were probed differently, naming both files."""
    def refuse(what: str):
        raise SystemExit(f"{a_path / 'probe.json'} and {b_path / 'probe.json'} differ in {what}: "
                         "they were not probed alike, so their scores cannot be pooled")

    if a["tasks"] != b["tasks"]:
        refuse(f"tasks ({a['tasks']} against {b['tasks']})")
    if "settings" in a and "settings" in b and a["settings"] != b["settings"]:
        refuse(f"settings ({a['settings']} against {b['settings']})")
    if ("drift" in a) != ("drift" in b):
        refuse("CKA drift (one has it, one has not)")
    if "drift" in a and a["drift"]["examples"] != b["drift"]["examples"]:
        refuse(f"the number of CKA examples ({a['drift']['examples']} against {b['drift']['examples']})")
    facts_a, facts_b = data_facts(a, a_path), data_facts(b, b_path)
    for task in a["tasks"]:
        if facts_a[task] != facts_b[task]:
            refuse(f"{task}'s data ({facts_a[task]} against {facts_b[task]})")
    for name in set(a["probes"]) & set(b["probes"]):
        if not _close(a["probes"][name], b["probes"][name]):
            refuse(f"the probe results of {name}, which both probed")
        if "drift" in a and not _close(a["drift"]["checkpoints"][name], b["drift"]["checkpoints"][name]):
            refuse(f"the CKA drift of {name}, which both probed")


def _close(a, b, rel: float = 1e-4) -> bool:
    """Equal results: the same keys and values, numbers to ``rel``, except whether the
    features came from the cache. Another machine's floating-point order moves them a
    little (the pre-trained MiniLM's STS-B probe: Spearman by 9e-6 relative, Pearson by
    6e-7, between two sessions); another setting moves them by far more."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - {"features_cached"}
        return all(k in a and k in b and _close(a[k], b[k], rel) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)
    return a == b


def merge(folders: list[Path]) -> dict:
    reports = [load(folder) for folder in folders]
    if not set.intersection(*(set(r["probes"]) for r in reports)):
        raise SystemExit(f"{', '.join(str(f) for f in folders)}: the reports share no probed encoder, so nothing "
                         "shows they were probed alike: probe one encoder in each (e.g. the pre-trained one, "
                         "--include-base)")
    for (i, a), (j, b) in itertools.combinations(enumerate(reports), 2):
        check_alike(a, b, folders[i], folders[j])
    merged = {"checkpoints": {}, "tasks": reports[0]["tasks"], "probes": {}, "merged_from": []}
    settings = [r["settings"] for r in reports if "settings" in r]
    if settings:
        merged["settings"] = settings[0]
    for report, folder in zip(reports, folders):
        merged["merged_from"] += report.get("merged_from", [str(folder)])
        for name, by_task in report["probes"].items():  # an encoder in several reports: the first's values
            if name not in merged["probes"]:
                merged["probes"][name] = by_task
                merged["checkpoints"][name] = report["checkpoints"].get(name)
    named = {}
    for name, checkpoint in merged["checkpoints"].items():
        if checkpoint is not None and named.setdefault(checkpoint, name) != name:
            raise SystemExit(f"{checkpoint} is probed as both {named[checkpoint]} and {name}: one encoder would "
                             "count as two seeds")
    merged["groups"] = group_scores(merged["probes"], merged["tasks"])
    if "drift" in reports[0]:
        merged["drift"] = {**reports[0]["drift"], "checkpoints": {}}
        for report in reports:
            for name, layers in report["drift"]["checkpoints"].items():
                merged["drift"]["checkpoints"].setdefault(name, layers)
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="rxf probe output folders (each with probe.json)")
    parser.add_argument("--output-dir", required=True, type=Path, help="merged probe.json, probe.md, probe.png, cka.png")
    args = parser.parse_args(argv)
    if len(args.reports) < 2:
        parser.error("give at least two probe folders to merge")
    resolved = [folder.resolve() for folder in args.reports]
    if len(set(resolved)) < len(resolved):
        parser.error("a probe folder is given twice")
    if args.output_dir.resolve() in resolved:
        parser.error(f"--output-dir {args.output_dir} is one of the reports to merge; choose another folder")
    report = merge(args.reports)
    replace_folder_whole(args.output_dir, REPORT_FILES, lambda folder: write_probe_report(folder, report),
                         "a probe report")
    print(probe_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
