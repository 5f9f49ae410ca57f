"""The probe report (Aghajanyan et al. 2021, Figure 3): per-method means over seeds, the
markdown table and the files of ``rxf probe``. Kept apart from the probing itself, which
needs torch and scikit-learn, so that ``scripts/merge_probes.py`` merges reports in a
second rather than importing both."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rxf.jsonio import write_json_atomic
from rxf.tables import percent


def group_scores(probes: dict, tasks: list[str]) -> dict:
    """Per group of checkpoints (the part of a name before "/", e.g. the method of
    "r3f/seed2"), the mean, standard deviation (ddof 1) and count of each task's probe
    score, and of its training score."""
    groups: dict[str, list[dict]] = {}
    for name, by_task in probes.items():
        groups.setdefault(name.split("/")[0], []).append(by_task)
    summary = {}
    for group, members in groups.items():
        summary[group] = {}
        for task in tasks:
            # A score read back from probe.json is None where it was NaN (rxf writes NaN as null).
            scores = np.array([m[task]["score"] for m in members], dtype=float)
            train = np.array([m[task]["train_score"] for m in members], dtype=float)
            summary[group][task] = {"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1
                                    else 0.0, "n": len(scores), "train_mean": float(train.mean())}
    return summary


def write_probe_report(out: Path, report: dict) -> None:
    """probe.json, probe.md, probe.png (and cka.png when the report has drift) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "probe.json", report)
    (out / "probe.md").write_text(probe_table(report))
    from rxf.probing.plots import plot_cka, plot_probes

    plot_probes(report, out / "probe.png")
    if "drift" in report:
        plot_cka(report["drift"], out / "cka.png")


def probe_table(report: dict) -> str:
    tasks = report["tasks"]
    first = next(iter(report["probes"].values()))
    lines = ["| checkpoint | " + " | ".join(f"{t} ({first[t]['main_metric']})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for name, by_task in report["probes"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{percent(by_task[t]['score'])} ({percent(by_task[t]['train_score'])})" for t in tasks) + " |")
    lines.append("| majority class | " + " | ".join(
        percent(first[t]["majority"]) for t in tasks) + " |")
    groups = report.get("groups", {})
    if any(g[tasks[0]]["n"] > 1 for g in groups.values()):
        lines += ["", "By method, over seeds: mean ± std of the dev score ×100 (n; mean training score)", "",
                  "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for group, by_task in groups.items():
            lines.append(f"| {group} | " + " | ".join(
                f"{percent(by_task[t]['mean'])} ± {percent(by_task[t]['std'])} ({by_task[t]['n']}; "
                f"{percent(by_task[t]['train_mean'])})" for t in tasks) + " |")
    text = ("Linear probe on the frozen encoder: dev score ×100 (training score in brackets; regularisation chosen "
            "by 5-fold cross-validation on the training features)\n\n" + "\n".join(lines) + "\n")
    if "drift" in report:
        drift = report["drift"]
        names = list(drift["checkpoints"])
        text += (f"\nLinear CKA to {drift['reference']} per layer (mean-pooled, {drift['examples']} dev examples of "
                 f"{tasks[0]}); effective rank in brackets\n\n| layer | " + " | ".join(names) + " |\n|---|"
                 + "---|" * len(names) + "\n")
        for i in range(len(drift["checkpoints"][names[0]])):
            cells = [f"{d[i]['cka']:.3f} ({d[i]['effective_rank']:.1f})" for d in drift["checkpoints"].values()]
            text += f"| {i} | " + " | ".join(cells) + " |\n"
    return text
