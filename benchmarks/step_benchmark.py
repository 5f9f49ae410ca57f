"""Time one full update (forward, backward, optimiser step) of each method against STD.

Methods run interleaved in one process after warm-up, so machine noise hits all of them
alike; the report gives medians over repetitions and ratios to STD, with the counted
forward/backward passes and the FLOPs of one update (``torch.utils.flop_counter``).
Never run as a test.

    python benchmarks/step_benchmark.py                      # embedded MiniLM, CPU, 32 x 128
    python benchmarks/step_benchmark.py --config bert-base   # random-init BERT-base size
    python benchmarks/step_benchmark.py --config bert-large --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification, BertConfig

from rxf import EMATeacher, MethodOptions, apply_spectral_norm, freelb_step, r3f_loss, smart_loss, standard_loss

SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
METHODS = {
    "std": MethodOptions(method="std"),
    "r3f": MethodOptions(method="r3f"),
    "r4f": MethodOptions(method="r4f"),
    "smart1": MethodOptions(method="smart", smart_steps=1),
    "smart2": MethodOptions(method="smart", smart_steps=2),
    "freelb2": MethodOptions(method="freelb", freelb_steps=2),
    "freelb3": MethodOptions(method="freelb", freelb_steps=3),
}


def build_model(args) -> torch.nn.Module:
    if args.config == "minilm":
        from rxf.defaults import default_model_path

        return AutoModelForSequenceClassification.from_pretrained(args.model or default_model_path(), num_labels=2)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, num_labels=2, **SIZES[args.config])
    return AutoModelForSequenceClassification.from_config(config)


class Runner:
    """One method's model copy, optimiser and update function."""

    def __init__(self, name: str, base: torch.nn.Module, batch: dict, args):
        self.name, self.batch, self.options = name, batch, METHODS[name]
        self.model = copy.deepcopy(base).train()
        if self.options.method == "r4f":
            apply_spectral_norm(self.model)
        self.teacher = EMATeacher(self.model, self.options) if self.options.method == "smart" else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.autocast = (
            torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
        )
        self.logs: dict = {}

    def update(self) -> None:
        with self.autocast:
            if self.options.method == "freelb":
                _, self.logs = freelb_step(self.model, self.batch, self.options)
            else:
                if self.options.method == "smart":
                    loss, self.logs = smart_loss(self.model, self.batch, self.options, self.teacher)
                elif self.options.method in ("r3f", "r4f"):
                    loss, self.logs = r3f_loss(self.model, self.batch, self.options)
                else:
                    loss, self.logs = standard_loss(self.model, self.batch)
                loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            self.teacher.update(self.model, 1, 10)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["minilm", *SIZES], default="minilm")
    parser.add_argument("--model", default=None, help="local model folder for --config minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = build_model(args).to(args.device)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len), device=args.device),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=args.device),
        "labels": torch.randint(0, 2, (args.batch_size,), device=args.device),
    }
    names = args.methods.split(",")
    runners = [Runner(name, base, batch, args) for name in names]
    del base

    flops = {}
    for runner in runners:
        with FlopCounterMode(display=False) as counter:
            runner.update()
        flops[runner.name] = counter.get_total_flops()
    for _ in range(args.warmup):
        for runner in runners:
            runner.update()
    times = {r.name: [] for r in runners}
    peak = {}
    for _ in range(args.repeats):
        for runner in runners:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            synchronize(args.device)
            start = time.perf_counter()
            runner.update()
            synchronize(args.device)
            times[runner.name].append(time.perf_counter() - start)
            if args.device == "cuda":
                # What the update itself allocates (activations, gradients), above the
                # weights and optimiser states of every method's model resident here.
                peak[runner.name] = max(peak.get(runner.name, 0), torch.cuda.max_memory_allocated() - resident)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# {args.config}, batch {args.batch_size} x {args.seq_len}, {args.dtype}, {args.device} ({device_name}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} after {args.warmup} warm-up")
    print("| method | fwd/bwd | GFLOP | FLOP ratio | median s | time ratio | time/FLOP ratio | ex/s | update peak GiB | peak ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    ref = names[0]
    ref_time, ref_flops = statistics.median(times[ref]), flops[ref]
    for runner in runners:
        name = runner.name
        median = statistics.median(times[name])
        row = {
            "method": name, "forward": runner.logs["forward_passes"], "backward": runner.logs["backward_passes"],
            "gflop": flops[name] / 1e9, "flop_ratio": flops[name] / ref_flops, "median_s": median,
            "time_ratio": median / ref_time, "examples_per_s": args.batch_size / median,
            "update_peak_bytes": peak.get(name), "peak_mem_ratio": peak[name] / peak[ref] if peak else None,
            "times": times[name],
        }
        rows.append(row)
        mem = f"{peak[name] / 2**30:.2f} | {row['peak_mem_ratio']:.2f}" if peak else "n/a | n/a"
        print(f"| {name} | {row['forward']}/{row['backward']} | {row['gflop']:.0f} | {row['flop_ratio']:.2f} | "
              f"{median:.3f} | {row['time_ratio']:.2f} | {row['time_ratio'] / row['flop_ratio']:.2f} | "
              f"{row['examples_per_s']:.1f} | {mem} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
