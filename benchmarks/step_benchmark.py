"""Time one full update (forward, backward, optimiser step) of every method against STD.

A thin front to ``rxf.experiments.cost`` (also behind ``rxf cost``): methods interleaved
in one process after warm-up, medians over repetitions, ratios to STD, counted passes,
FLOPs and peak memory. Never run as a test.

    python benchmarks/step_benchmark.py                      # embedded MiniLM, CPU, 32 x 128
    python benchmarks/step_benchmark.py --config bert-base   # random-init BERT-base size
    python benchmarks/step_benchmark.py --config bert-large --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from rxf.experiments.cost import build_model, measure, method_grid, random_batch, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["minilm", "bert-base", "bert-large"], default="minilm")
    parser.add_argument("--model", default=None, help="a model folder or hub name instead of --config")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    model = build_model(args.model, args.config).to(args.device)
    batch = random_batch(args.batch_size, args.seq_len, model.config.vocab_size, args.device)
    rows = measure(model, batch, method_grid(r3f_variants=True), args.device, args.dtype == "bf16", args.warmup, args.repeats)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# {args.model or args.config}, batch {args.batch_size} x {args.seq_len}, {args.dtype}, {args.device} "
          f"({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
