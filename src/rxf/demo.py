"""``rxf demo``: the offline quickstart. Fine-tunes the embedded MiniLM with each method
on the small demo dataset bundled in the package (made-up reviews written for rxf; a
demo, not a benchmark) and prints a side-by-side table. About 5 minutes on 2 CPU cores
for STD and R3F.
"""

from __future__ import annotations

from pathlib import Path

from rxf.finetune import FinetuneSpec, run_finetune
from rxf.methods.options import MethodOptions
from rxf.tasks.glue import ClassificationTask

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_TASK = ClassificationTask(
    name="demo", folder="", text_columns=("sentence",), label_column="label", labels=("0", "1"),
    metric="accuracy", label_names=("negative", "positive"),
)


def run_demo(output_dir: str = "rxf-demo", methods=("std", "r3f"), seed: int = 1) -> list[dict]:
    rows = []
    for method in methods:
        spec = FinetuneSpec(
            task="demo", output_dir=str(Path(output_dir) / method), data_dir=str(DEMO_DATA), seed=seed,
            epochs=3, learning_rate=1e-4, batch_size=16, max_length=32, warmup_ratio=0.06,
        )
        print(f"rxf demo: fine-tuning MiniLM-L6 with {method} on {DEMO_DATA} ...", flush=True)
        rows.append(run_finetune(spec, MethodOptions(method=method), task=DEMO_TASK))
    print()
    print("rxf demo (made-up demo data, not a benchmark): dev accuracy of the embedded MiniLM-L6")
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    header = "| method | best dev acc | final dev acc | s to best | train s | fwd/bwd per update |"
    lines = [header, "|" + "---|" * 6]
    for r in rows:
        passes = r["passes_per_update"]
        lines.append(
            f"| {r['method']} | {100 * r['best']['dev']['accuracy']:.1f} | {100 * r['final']['dev']['accuracy']:.1f} "
            f"| {r['seconds_to_best']:.0f} | {r['train_seconds']:.0f} | {passes['forward']}/{passes['backward']} |"
        )
    return "\n".join(lines)
