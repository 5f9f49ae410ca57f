"""PNG plots for the probing experiments (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rxf.plotting import plt, save_figure


def plot_probes(report: dict, path: Path) -> None:
    """Grouped bars: probe score per task (groups of bars) and method or checkpoint (bars:
    the mean over a method's seeds, with their standard deviation); majority as a dash."""
    tasks, probes = report["tasks"], report["probes"]
    groups = report.get("groups") or {name: {t: {"mean": p[t]["score"], "std": 0.0} for t in tasks}
                                      for name, p in probes.items()}
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(tasks), 3.8))
    for i, (name, by_task) in enumerate(groups.items()):
        x = np.arange(len(tasks)) + (i - (len(groups) - 1) / 2) * width
        ax.bar(x, [100 * by_task[t]["mean"] for t in tasks], width, label=name,
               yerr=[100 * by_task[t]["std"] for t in tasks], capsize=2)
    first = next(iter(probes.values()))
    for j, task in enumerate(tasks):
        if first[task]["majority"] is not None:
            ax.hlines(100 * first[task]["majority"], j - 0.45, j + 0.45, colors="black", linestyles="dashed")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("probe dev score ×100 (dashes: majority class)")
    ax.set_title("Linear probes on frozen encoders")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_cka(drift: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, layers in drift["checkpoints"].items():
        ax.plot([d["layer"] for d in layers], [d["cka"] for d in layers], marker="o", label=name)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("linear CKA to the reference")
    ax.set_ylim(0, 1.05)
    ax.set_title("Representation drift from the pre-trained model")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_lines(series: dict[str, list[float]], labels: list[str], path: Path, title: str, ylabel: str,
               errors: dict[str, list[float]] | None = None) -> None:
    """One line per method over stages (chain) or stages × cycles (cycle); ``errors``
    (a standard deviation per point, e.g. over seeds) draws error bars."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(labels), 3.8))
    for name, values in series.items():
        spread = None if errors is None else [100 * e for e in errors[name]]
        ax.errorbar(range(len(values)), [100 * v for v in values], yerr=spread, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)
