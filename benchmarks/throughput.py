"""The throughput levers of the evidence study, each as a ratio to its baseline in the same
run (this CPU's speed wanders, so only ratios within one run mean anything):

- ``grouping``: one epoch of STD on a real pair task with batches grouped by length
  against random batches — padded tokens and wall time;
- ``jobs``: two fine-tuning runs as two single-thread processes at once against one after
  the other in one process with every core;
- ``eval``: evaluating the dev split sorted by length against in file order, at several
  evaluation batch sizes (same predictions: checked).

Never run as a test.

    python benchmarks/throughput.py --data-dir ../shared/data/glue --task mrpc
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rxf.console import quiet_libraries
from rxf.experiments.parallel import run_jobs
from rxf.finetune import run_finetune
from rxf.methods import MethodOptions
from rxf.spec import FinetuneSpec


def _train_seconds(spec: FinetuneSpec) -> float:
    shutil.rmtree(spec.output_dir, ignore_errors=True)
    return run_finetune(spec, MethodOptions(method="std"))["train_seconds"]


def grouping(base: FinetuneSpec, repeats: int) -> dict:
    """Training seconds of one epoch with and without length grouping, alternating."""
    times = {"random": [], "grouped": []}
    for _ in range(repeats):
        for name in times:
            spec = dataclasses.replace(base, group_by_length=name == "grouped",
                                       output_dir=str(Path(base.output_dir) / f"grouping-{name}"))
            times[name].append(_train_seconds(spec))
    return {"seconds": times, "ratio_grouped_to_random": float(np.median(times["grouped"]) / np.median(times["random"]))}


def _wall(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def jobs(base: FinetuneSpec) -> dict:
    """Two runs one after the other (all cores each) against two at once (a core each)."""
    specs = [dataclasses.replace(base, seed=seed, output_dir=str(Path(base.output_dir) / f"jobs-{seed}"))
             for seed in (1, 2)]

    def clean():
        for spec in specs:
            shutil.rmtree(spec.output_dir, ignore_errors=True)

    clean()
    sequential = _wall(lambda: run_jobs(run_finetune, [(s, MethodOptions(method="std")) for s in specs], 1))
    clean()
    parallel = _wall(lambda: run_jobs(run_finetune, [(s, MethodOptions(method="std")) for s in specs], 2))
    return {"sequential_seconds": sequential, "two_jobs_seconds": parallel, "ratio_two_jobs_to_sequential":
            parallel / sequential, "threads": torch.get_num_threads()}


def evaluation(base: FinetuneSpec, batch_sizes: list[int], repeats: int) -> dict:
    """Seconds to evaluate the dev split in file order and sorted by length."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from rxf.defaults import default_model_path
    from rxf.tasks.data import load_task_data
    from rxf.tasks.tokenize import tokenize

    model_path = base.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).eval()
    dev = next(ex for name, ex in load_task_data(base).items() if name != "train")
    data = tokenize(dev, tokenizer, base.max_length)
    collate = DataCollatorWithPadding(tokenizer)
    features = [{k: v for k, v in row.items() if k != "labels"} for row in data]
    order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")

    @torch.no_grad()
    def predict(rows, size):
        return torch.cat([model(**collate(rows[i:i + size])).logits for i in range(0, len(rows), size)])

    rows = {}
    for size in batch_sizes:
        timing = {"file order": [], "sorted": []}
        for _ in range(repeats):
            timing["file order"].append(_wall(lambda: predict(features, size)))
            timing["sorted"].append(_wall(lambda: predict([features[i] for i in order], size)))
        plain, ordered = predict(features, size), predict([features[i] for i in order], size)
        same = bool(torch.equal(plain.argmax(-1), ordered[np.argsort(order)].argmax(-1)))
        rows[size] = {"seconds": timing, "same_predictions": same, "max_logit_difference":
                      float((plain - ordered[np.argsort(order)]).abs().max()),
                      "ratio_sorted_to_file_order": float(np.median(timing["sorted"]) / np.median(timing["file order"]))}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="grouping,jobs,eval")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    quiet_libraries()  # the tables, not transformers' load report of every model copy
    work = Path(tempfile.mkdtemp(prefix="rxf-throughput-"))
    base = FinetuneSpec(task=args.task, output_dir=str(work), data_dir=args.data_dir, epochs=1,
                        max_train_samples=args.train_samples, max_length=args.max_length, batch_size=32,
                        learning_rate=2e-5, progress=False, eval_steps=10**6)
    report = {"task": args.task, "train_samples": args.train_samples, "max_length": args.max_length,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    only = args.only.split(",")
    if "grouping" in only:
        report["grouping"] = grouping(base, args.repeats)
        print("grouping:", json.dumps(report["grouping"]), flush=True)
    if "jobs" in only:
        report["jobs"] = jobs(base)
        print("jobs:", json.dumps(report["jobs"]), flush=True)
    if "eval" in only:
        report["eval"] = evaluation(base, [32, 64, 128], args.repeats)
        print("eval:", json.dumps(report["eval"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
