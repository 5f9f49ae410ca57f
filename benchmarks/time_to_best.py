"""Wall time to the best checkpoint (Aghajanyan et al. 2021, Figure 1): fine-tune the
embedded MiniLM on a real SST-2 slice with STD, R3F, SMART and FreeLB (and R3F with a
gradient-free noised pass, ``r3f_noised_no_grad``, beside R3F), evaluating often, and
report how many training seconds each needed to reach its best dev accuracy.

Each run is an ``rxf finetune`` run (``rxf.finetune.run_finetune``) with its own folder
and results.json: rerunning the script skips finished runs and resumes interrupted ones.
Training seconds exclude evaluation and checkpointing (``RXFTrainer``'s clock pauses).
Never run as a test.

    python benchmarks/time_to_best.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from rxf.console import quiet_libraries
from rxf.finetune import FinetuneSpec, run_finetune
from rxf.methods import MethodOptions

VARIANTS = {
    "std": MethodOptions(method="std"),
    "r3f": MethodOptions(method="r3f"),
    "r3f-nograd": MethodOptions(method="r3f", r3f_noised_no_grad=True),
    "smart": MethodOptions(method="smart"),
    "freelb": MethodOptions(method="freelb"),
}


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: per variant, medians over seeds of the best accuracy, the seconds to
    reach it and the whole run's training seconds."""
    lines = ["| method | seeds | best dev acc (median) | updates to best | seconds to best (median) | "
             "train seconds (median) | train s / update |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        best = statistics.median(100 * r["best"]["dev"]["accuracy"] for r in runs)
        to_best = statistics.median(r["seconds_to_best"] for r in runs)
        train = statistics.median(r["train_seconds"] for r in runs)
        steps = statistics.median(r["best_step"] for r in runs)
        per_update = statistics.median(r["train_seconds"] / r["updates"] for r in runs)
        lines.append(f"| {name} | {len(runs)} | {best:.1f} | {steps:.0f} | {to_best:.0f} | {train:.0f} | {per_update:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder with SST-2/ in the GLUE layout")
    parser.add_argument("--model", default=None, help="default: the embedded MiniLM")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--eval-steps", type=int, default=8, help="evaluate (and checkpoint) every N updates")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output-dir", default="runs/time-to-best")
    args = parser.parse_args()
    quiet_libraries()  # the tables, not transformers' load report of every model copy

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    out = Path(args.output_dir)
    base = FinetuneSpec(
        task="sst2", output_dir="", model=args.model, data_dir=args.data_dir, max_train_samples=args.max_train_samples,
        epochs=args.epochs, eval_steps=args.eval_steps, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_length=args.max_length, progress=False, save_total_limit=1,
    )
    results: dict[str, list[dict]] = {}
    for name in variants:
        for seed in (int(s) for s in args.seeds.split(",")):
            spec = dataclasses.replace(base, seed=seed, output_dir=str(out / name / f"seed{seed}"))
            print(f"time_to_best: {name} seed {seed}", flush=True)
            results.setdefault(name, []).append(run_finetune(spec, VARIANTS[name]))
    report = table(results)
    print(report)
    (out / "time_to_best.md").write_text(report + "\n")
    (out / "time_to_best.json").write_text(json.dumps(
        {name: [{k: r[k] for k in ("seed", "best", "best_step", "seconds_to_best", "train_seconds", "updates",
                                   "passes_per_update", "hardware")} for r in runs]
         for name, runs in results.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
