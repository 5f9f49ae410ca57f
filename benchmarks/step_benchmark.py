"""Time one full update (forward, backward, optimiser step) of every method against STD,
and against what users would run instead (``peers.py``).

A front to ``rxf.experiments.cost`` (also behind ``rxf cost``): methods and peers
interleaved in one process after warm-up, medians over repetitions, ratios to STD, counted
passes, FLOPs and peak memory; then the performance targets, each computed from rows of
this one run with a bootstrap interval over its rounds (a noisy machine's spread can be
wider than a bound's margin). Never run as a test.

    python benchmarks/step_benchmark.py                      # embedded MiniLM, CPU, 32 x 128
    python benchmarks/step_benchmark.py --config bert-base   # random-init BERT-base size
    python benchmarks/step_benchmark.py --config bert-large --device cuda --dtype bf16
    python benchmarks/step_benchmark.py --from-json rows.json  # reprint a saved run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics

import torch

from peers import peer_runners, rxf_rows_for_peers
from rxf.console import quiet_libraries
from rxf.experiments.cost import build_model, measure, method_grid, random_batch, table
from rxf.methods import MethodOptions

# (what, numerator, denominator, quantity, bound): numerator / denominator <= bound.
TARGETS = [
    ("rxf STD update vs plain Trainer (same optimiser: STD++)", "rxf-trainer-std++", "hf-trainer", "median_s", 1.03),
    ("rxf STD update vs plain Trainer (no bias correction)", "rxf-trainer-std", "hf-trainer", "median_s", 1.03),
    ("R3F time ratio / its FLOP ratio", "r3f", "std", "time_per_flop", 1.05),
    ("R4F vs R3F time", "r4f", "r3f", "median_s", 1.03),
    ("R3F with a gradient-free noised pass vs STD time", "r3f-nograd", "std", "median_s", 1.40),
    ("rxf SMART S=1 (with Bregman teacher) vs smart-pytorch S=1", "smart1", "smart-pytorch1", "median_s", 1.00),
    ("rxf SMART S=1 without teacher vs smart-pytorch S=1", "smart1-nobregman", "smart-pytorch1", "median_s", 1.00),
    ("rxf R3F vs fairseq-style R3F", "r3f", "fairseq-r3f", "median_s", 1.00),
    ("R3F peak memory vs STD", "r3f", "std", "peak_bytes", 2.00),
]


def ratio_interval(num: list[float], den: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of median(num) / median(den), resampling whole rounds (the
    i-th times of both ran in the same round), so that a noisy machine's spread shows."""
    rng = random.Random(seed)
    rounds = range(len(num))
    ratios = sorted(
        statistics.median(num[i] for i in pick) / statistics.median(den[i] for i in pick)
        for pick in ([rng.choice(rounds) for _ in rounds] for _ in range(resamples))
    )
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def targets(rows: list[dict]) -> str:
    """Markdown: each target's measured ratio, its 95% interval over rounds, its bound and
    whether it holds: "yes" or "no" where the whole interval is on one side of the bound,
    "within noise" where the interval spans it."""
    by_name = {r["method"]: r for r in rows}
    lines = ["| target | measured | 95% interval | bound | holds |", "|---|---|---|---|---|"]
    for what, num, den, quantity, bound in TARGETS:
        if num not in by_name or den not in by_name or (quantity == "peak_bytes" and not (
                by_name[num][quantity] and by_name[den][quantity])):  # no memory reading off CUDA
            lines.append(f"| {what} | not measured | | {bound:.2f} | n/a |")
            continue
        if quantity == "peak_bytes":
            value = by_name[num][quantity] / by_name[den][quantity]
            lines.append(f"| {what} | {value:.3f} | | {bound:.2f} | {'yes' if value <= bound else 'no'} |")
            continue
        # A time ratio; R3F's is set against its FLOP ratio.
        scale = 1 / by_name[num]["flop_ratio"] if quantity == "time_per_flop" else 1.0
        value = by_name[num]["median_s"] / by_name[den]["median_s"] * scale
        lo, hi = (x * scale for x in ratio_interval(by_name[num]["times"], by_name[den]["times"]))
        verdict = "yes" if hi <= bound else "no" if lo > bound else "within noise"
        lines.append(f"| {what} | {value:.3f} | {lo:.3f}–{hi:.3f} | {bound:.2f} | {verdict} |")
    return "\n".join(lines)


def nograd_pass_share(rows: list[dict]) -> str | None:
    """What ``r3f-nograd`` adds to STD, against its gradient-free pass timed alone: near 1
    means the variant wastes nothing beyond that pass."""
    by_name = {r["method"]: r["median_s"] for r in rows}
    if not {"std", "r3f-nograd", "forward-nograd"} <= by_name.keys():
        return None
    added, alone = by_name["r3f-nograd"] - by_name["std"], by_name["forward-nograd"]
    line = (f"r3f-nograd - std = {added:.3f} s; its gradient-free training-mode pass alone (forward-nograd) = "
            f"{alone:.3f} s ({alone / by_name['std']:.2f} x STD); added / alone = {added / alone:.2f}")
    if "forward-nograd-nodropout" in by_name:
        masks = alone - by_name["forward-nograd-nodropout"]
        line += f"; of that pass, drawing the dropout masks = {masks:.3f} s ({masks / by_name['std']:.2f} x STD)"
    return line


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
    parser.add_argument("--smart-steps", default="1,2", help="comma-separated S for SMART rows")
    parser.add_argument("--freelb-steps", default="2,3", help="comma-separated K for FreeLB rows")
    parser.add_argument("--no-peers", action="store_true", help="rxf's methods only")
    parser.add_argument("--only", default=None,
                        help="comma-separated row names to time (std, the baseline, always runs): every row holds "
                             "its own model copy and optimiser, which large models may not fit all at once")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--from-json", default=None, help="print the tables of an earlier --json file; time nothing")
    args = parser.parse_args()
    quiet_libraries()  # the tables, not transformers' load report of every model copy
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        report(argparse.Namespace(**saved["args"]), saved["device"], saved["torch"], saved["threads"], saved["rows"])
        return

    smart_steps = tuple(int(s) for s in args.smart_steps.split(","))
    freelb_steps = tuple(int(k) for k in args.freelb_steps.split(","))
    bf16 = args.dtype == "bf16"
    model = build_model(args.model, args.config).to(args.device)
    batch = random_batch(args.batch_size, args.seq_len, model.config.vocab_size, args.device)
    only = set(args.only.split(",")) | {"std"} if args.only else None

    def keep(name: str) -> bool:
        return only is None or name in only

    grid = method_grid(smart_steps, freelb_steps, r3f_variants=True)
    peers = []
    if not args.no_peers:
        grid.update(rxf_rows_for_peers(MethodOptions(), smart_steps))
        peers = peer_runners(model, batch, MethodOptions(), smart_steps, bf16, args.device, keep)
    grid = {name: options for name, options in grid.items() if keep(name)}
    rows = measure(model, batch, grid, args.device, bf16, args.warmup, args.repeats, extra_runners=peers)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    if args.json:  # written first: the rows are the expensive part
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    report(args, device, torch.__version__, torch.get_num_threads(), rows)


def report(args: argparse.Namespace, device: str, torch_version: str, threads: int, rows: list[dict]) -> None:
    """Print the cost table, the targets and the gradient-free pass's share."""
    print(f"# {args.model or args.config}, batch {args.batch_size} x {args.seq_len}, {args.dtype}, {args.device} "
          f"({device}), torch {torch_version}, {threads} threads; median of {args.repeats} after {args.warmup} warm-up")
    print(table(rows))
    print()
    print(targets(rows))
    if share := nograd_pass_share(rows):
        print()
        print(share)


if __name__ == "__main__":
    main()
