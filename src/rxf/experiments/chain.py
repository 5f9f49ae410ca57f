"""Sequential and cyclic fine-tuning with probes (Aghajanyan et al. 2021, Sections 4.2-4.3).

``run_chain`` (Figure 4): fine-tune along a task sequence, default SST-2 -> QNLI -> QQP ->
RTE, each stage starting from the previous stage's best checkpoint with a fresh head;
after every stage, probe the *source* task (the first) with a fresh linear layer on the
frozen encoder. How fast that probe degrades is how fast the method forgets.

``run_cycle`` (Figure 5): the same sequence repeated for several cycles; before training
on a task, probe it with the current encoder. How much each cycle retains is how little
the method collapses.

Every stage trains with the shared settings, except where ``task_epochs`` gives a task its
own number of epochs: a chain's tasks differ in size (RTE's 2,490 training pairs against
QQP's 364k), and a small task's stage may need several epochs to learn at all.

Every stage is an ``rxf finetune`` run in its own folder and every probe is stored beside
it, so a rerun after an interruption skips finished stages and probes. A stored probe is
reused only while it is the probe asked for (same weights, examples, pooling, length and
seed): a stage retrained in place, or a rerun with ``--pooling mean``, probes again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from rxf.experiments.parallel import run_jobs
from rxf.finetune import FinetuneSpec, run_finetune
from rxf.jsonio import write_json_atomic
from rxf.methods.options import MethodOptions
from rxf.models import model_fingerprint
from rxf.probing.plots import plot_lines
from rxf.probing.probe import probe_checkpoint, task_splits
from rxf.tasks.glue import get_task

DEFAULT_CHAIN = ("sst2", "qnli", "qqp", "rte")


def _probe_identity(checkpoint: str, splits: dict, base: FinetuneSpec, pooling: str) -> dict:
    """What a probe's score depends on: the weights (not the path, which a retrained stage
    keeps), the examples with their labels, the pooling, the length and the seed."""
    examples = hashlib.sha256(json.dumps(
        {name: [split.text_a, split.text_b, split.labels] for name, split in splits.items()}).encode()).hexdigest()[:16]
    return {"weights": model_fingerprint(checkpoint), "examples": examples, "pooling": pooling,
            "max_length": base.max_length, "seed": base.seed}


def _read_probe(path: Path) -> dict | None:
    """A stored probe, or None where there is none or it is damaged: it is only a copy of
    what probing the frozen checkpoint again gives, so a damaged one is made again."""
    try:
        stored = json.loads(path.read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return stored if isinstance(stored, dict) else None


def _probe(folder: Path, checkpoint: str, task: str, data: dict, base: FinetuneSpec, pooling: str) -> dict:
    """Probe ``task`` with the frozen ``checkpoint``; stored beside the stage's ``folder``
    (not in it: a run folder holds one run) and reused while its identity holds."""
    path = folder.with_name(f"{folder.name}.probe-{task}.json")
    identity = _probe_identity(checkpoint, data[task], base, pooling)
    stored = _read_probe(path)
    if stored is not None and stored.get("identity") == identity:
        return stored
    result = {**probe_checkpoint(checkpoint, get_task(task), data[task], base.seed, base.max_length, pooling),
              "identity": identity}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result


def _stage(folder: Path, method: str, index: int, task: str, start: str, base: FinetuneSpec,
           options: MethodOptions, task_data: dict | None, task_epochs: dict | None) -> str:
    """Fine-tune one stage in ``folder`` (or reuse its finished run); returns its best checkpoint."""
    spec = dataclasses.replace(base, task=task, model=start, output_dir=str(folder),
                               data_dir=(task_data or {}).get(task, base.data_dir),
                               epochs=(task_epochs or {}).get(task, base.epochs), fresh_head=index > 0)
    print(f"rxf: {method} stage {index}: {task}, starting from {start}", flush=True)
    run_finetune(spec, dataclasses.replace(options, method=method))
    return str(folder / "best")


def _base_model(base: FinetuneSpec) -> str:
    if base.model is not None:
        return base.model
    from rxf.defaults import default_model_path

    return default_model_path()


def _chain(out: Path, method: str, tasks: list[str], base: FinetuneSpec, options: MethodOptions,
           task_data: dict | None, task_epochs: dict | None, pooling: str) -> list[dict]:
    """One method's chain: the source task's probe before the first stage and after each."""
    source = tasks[0]
    data = {source: task_splits(source, base, task_data)}
    checkpoint = _base_model(base)
    probe = functools.partial(_probe, task=source, data=data, base=base, pooling=pooling)
    stages = [{"stage": "pre-trained", **probe(out / method / "stage00-pretrained", checkpoint)}]
    for index, task in enumerate(tasks, start=1):
        folder = out / method / f"stage{index:02d}-{task}"
        checkpoint = _stage(folder, method, index, task, checkpoint, base, options, task_data, task_epochs)
        stages.append({"stage": f"after {task}", **probe(Path(checkpoint).parent, checkpoint)})
    return stages


def run_chain(out: Path, tasks: list[str], methods: list[str], base: FinetuneSpec, options: MethodOptions,
              task_data: dict[str, str] | None = None, jobs: int = 1, pooling: str = "cls",
              task_epochs: dict[str, float] | None = None) -> dict:
    """Fine-tune along ``tasks`` with each method (``jobs`` methods at a time) and probe
    ``tasks[0]`` after each stage, on ``pooling`` (``cls`` or ``mean``) representations;
    ``task_epochs`` overrides ``base.epochs`` for the stages of the tasks it names."""
    out = Path(out)
    source = tasks[0]
    for task in tasks:
        task_splits(task, base, task_data)  # check every stage's data before training starts
    base = dataclasses.replace(base, progress=base.progress and jobs == 1)
    chains = run_jobs(_chain, [(out, method, tasks, base, options, task_data, task_epochs, pooling)
                               for method in methods], jobs)
    report = {"tasks": tasks, "source": source, "methods": dict(zip(methods, chains))}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "chain.json", report)
    labels = [s["stage"] for s in next(iter(report["methods"].values()))]
    rows = ["| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for method, stages in report["methods"].items():
        rows.append(f"| {method} | " + " | ".join(f"{100 * s['score']:.1f}" for s in stages) + " |")
    title = f"Probe of the source task {source} after each stage ({pooling} pooling, dev ×100)"
    (out / "chain.md").write_text(title + "\n\n" + "\n".join(rows) + "\n")
    plot_lines({m: [s["score"] for s in st] for m, st in report["methods"].items()}, labels, out / "chain.png",
               f"{source} probe along the chain", f"{source} probe dev score ×100")
    return report


def run_cycle(out: Path, tasks: list[str], methods: list[str], cycles: int, base: FinetuneSpec,
              options: MethodOptions, task_data: dict[str, str] | None = None, pooling: str = "cls",
              task_epochs: dict[str, float] | None = None) -> dict:
    """Repeat the chain ``cycles`` times; probe each task just before training on it."""
    out = Path(out)
    data = {task: task_splits(task, base, task_data) for task in tasks}
    report = {"tasks": tasks, "cycles": cycles, "methods": {}}
    for method in methods:
        checkpoint, probes, index = _base_model(base), [], 0
        for cycle in range(1, cycles + 1):
            for task in tasks:
                index += 1
                folder = out / method / f"stage{index:02d}-c{cycle}-{task}"
                result = _probe(folder, checkpoint, task, data, base, pooling)
                probes.append({"cycle": cycle, "task": task, **result})
                checkpoint = _stage(folder, method, index, task, checkpoint, base, options, task_data, task_epochs)
        report["methods"][method] = probes
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cycle.json", report)
    rows = ["| method | cycle | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for method, probes in report["methods"].items():
        for cycle in range(1, cycles + 1):
            scores = {p["task"]: p["score"] for p in probes if p["cycle"] == cycle}
            rows.append(f"| {method} | {cycle} | " + " | ".join(f"{100 * scores[t]:.1f}" for t in tasks) + " |")
    title = f"Probe of each task just before training on it ({pooling} pooling, dev ×100)"
    (out / "cycle.md").write_text(title + "\n\n" + "\n".join(rows) + "\n")
    labels = [f"c{p['cycle']} {p['task']}" for p in next(iter(report["methods"].values()))]
    plot_lines({m: [p["score"] for p in ps] for m, ps in report["methods"].items()}, labels, out / "cycle.png",
               "Probe before each stage, per cycle", "probe dev score ×100")
    return report
