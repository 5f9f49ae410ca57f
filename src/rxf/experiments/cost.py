"""Measured cost of one update of each method, against STD in the same process — the
paper's Table 1 (Aghajanyan et al. 2021) with counted passes, FLOPs, time and memory.

Updates (forward, backward, optimiser step) run interleaved — every method once per
round, after warm-up, in a fresh (seeded) random order each round — so machine noise hits
all methods alike and no method always runs in the same place or after the same
neighbour (on a noisy 2-core CPU a fixed order showed up as a few percent between methods
of equal cost); times are medians over rounds. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``. Peak memory is what the update allocates
above what was allocated before it, from CUDA's allocator statistics.
CPUs have no such statistics: the process's resident set never shrinks once the first
updates have grown it (freed memory stays with the allocator), so its high-water mark
shows only growth beyond the largest earlier update, not an update's own peak; on CPUs
memory is therefore not reported.

Used by ``rxf cost`` and ``benchmarks/step_benchmark.py``.
"""

from __future__ import annotations

import contextlib
import copy
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from rxf.methods import MethodOptions, build_method

# Paper's Table 1: (forward, backward) per update, S = ascent steps. The regularisers that
# followed have no such table; their rows are what each algorithm implies: R-Drop two
# forward passes and one backward through both, the modifiers none beyond their loss's
# (a composite is counted by its loss, ``options.method``; Child-Tuning-D's one-off Fisher
# pass runs before the measured updates).
PAPER_PASSES = {
    "std": lambda o: (1, 1), "std++": lambda o: (1, 1), "r3f": lambda o: (2, 1), "r4f": lambda o: (2, 1),
    "smart": lambda o: (1 + o.smart_steps, 1 + o.smart_steps), "freelb": lambda o: (o.freelb_steps, o.freelb_steps),  # the paper's 1+S with K = 1+S steps
    "rdrop": lambda o: (2, 1),
    **{name: (lambda o: (1, 1)) for name in ("neftune", "noisytune", "hype", "childtune", "mixout")},
}
# The regularisers' rows of ``method_grid(regularisers=True)``: row name -> options.
REGULARISER_ROWS = {
    **{name: {"method": name} for name in ("rdrop", "neftune", "noisytune", "hype", "childtune", "mixout")},
    "childtune-f": {"method": "childtune", "childtune_mode": "f"},
    "r3f+noisytune": {"method": "r3f", "extras": "noisytune"},
}


def forward_units(forward: int, backward: int) -> int:
    """The paper's cost unit: a backward pass costs two forward passes."""
    return forward + 2 * backward


@dataclass
class UpdateRunner:
    """One method's own copy of the model, its optimiser and its update."""

    name: str
    options: MethodOptions
    model: torch.nn.Module
    batch: dict
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    logs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.model = copy.deepcopy(self.model).train()
        self.method = build_method(self.options, self.model)
        self.method.setup(self.model)
        # Child-Tuning-D's one-off Fisher pass, before (and outside) the measured updates.
        self.method.prepare(self.model, [self.batch])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)

    def update(self) -> None:
        with self.autocast:
            _, self.logs = self.method.step(self.model, self.batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(self.model, 1, 10)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _PeakMemory:
    """Memory an update allocates above what is allocated before it (bytes); None off CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        self.peak = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self.before


def measure(
    model: torch.nn.Module,
    batch: dict,
    methods: dict[str, MethodOptions],
    device: str = "cpu",
    bf16: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    extra_runners: list | None = None,
) -> list[dict]:
    """Time, count and weigh one update of each method; the first method is the baseline
    of every ratio. ``extra_runners`` (e.g. the peers in ``benchmarks/``) are timed in the
    same rounds: anything with ``name``, ``options`` (for the paper's columns), ``logs``
    (the passes it ran) and ``update()``. Returns one row per runner."""
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    runners = [UpdateRunner(name, options, model, batch, autocast()) for name, options in methods.items()]
    return measure_runners(runners + list(extra_runners or []), len(batch["input_ids"]), device, warmup, repeats)


def measure_runners(runners: list, batch_size: int, device: str = "cpu", warmup: int = 2, repeats: int = 5,
                    seed: int = 0) -> list[dict]:
    """``measure`` for ready-made runners; the first is the baseline. A runner may carry
    ``paper_passes`` (forward, backward) where its options' method does not say them."""
    flops: dict[str, int] = {}
    order = random.Random(seed)
    peaks: dict[str, int | None] = {r.name: None for r in runners}
    for runner in runners:  # the first update also creates the optimiser state: not timed or weighed
        with FlopCounterMode(display=False) as counter:
            runner.update()
        flops[runner.name] = counter.get_total_flops()
    for _ in range(warmup):
        for runner in order.sample(runners, len(runners)):
            runner.update()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(repeats):
        for runner in order.sample(runners, len(runners)):
            with _PeakMemory(device) as memory:
                _synchronize(device)
                start = time.perf_counter()
                runner.update()
                _synchronize(device)
            times[runner.name].append(time.perf_counter() - start)
            if memory.peak is not None:
                peaks[runner.name] = max(peaks[runner.name] or 0, memory.peak)

    base = runners[0].name
    base_time, base_flops = statistics.median(times[base]), flops[base]
    rows = []
    for runner in runners:
        forward, backward = int(runner.logs["forward_passes"]), int(runner.logs["backward_passes"])
        paper_forward, paper_backward = (getattr(runner, "paper_passes", None)
                                          or PAPER_PASSES[runner.options.method](runner.options))
        median = statistics.median(times[runner.name])
        peak, base_peak = peaks[runner.name], peaks[base]
        rows.append({
            "method": runner.name,
            "forward": forward, "backward": backward,
            "teacher_forward": int(runner.logs.get("teacher_forward_passes", 0)),
            "forward_units": forward_units(forward, backward),
            "paper_forward": paper_forward, "paper_backward": paper_backward,
            "paper_forward_units": forward_units(paper_forward, paper_backward),
            "gflop": flops[runner.name] / 1e9, "flop_ratio": flops[runner.name] / base_flops,
            "median_s": median, "time_ratio": median / base_time,
            "examples_per_s": batch_size / median,
            "peak_bytes": peak, "peak_ratio": peak / base_peak if peak and base_peak else None,
            "times": times[runner.name],
        })
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: the paper's Table 1 beside what was counted and measured."""
    lines = [
        "| method | paper fwd/bwd | paper cost (fwd units) | counted fwd/bwd | counted cost | GFLOP | FLOP ratio "
        "| median s | time ratio | ex/s | peak MiB | peak ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        teacher = f" (+{r['teacher_forward']} teacher)" if r["teacher_forward"] else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "n/a"
        ratio = f"{r['peak_ratio']:.2f}" if r["peak_ratio"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['paper_forward']}/{r['paper_backward']} | {r['paper_forward_units']} | "
            f"{r['forward']}/{r['backward']}{teacher} | {r['forward_units']} | {r['gflop']:.0f} | {r['flop_ratio']:.2f} | "
            f"{r['median_s']:.3f} | {r['time_ratio']:.2f} | {r['examples_per_s']:.1f} | {peak} | {ratio} |"
        )
    return "\n".join(lines)


def method_grid(smart_steps=(1, 2), freelb_steps=(2, 3), base: MethodOptions | None = None,
                r3f_variants: bool = False, regularisers: bool = False) -> dict[str, MethodOptions]:
    """STD first (the baseline), then R3F, R4F, SMART and FreeLB at several step counts;
    with ``r3f_variants`` also R3F with a gradient-free noised pass, as one 2B batch and as
    two passes of B (plain ``r3f`` uses the device's default, see ``r3f_concat_batch``);
    with ``regularisers`` also R-Drop, NEFTune, NoisyTune, HyPe, Child-Tuning (D and F),
    Mixout and one composite, R3F + NoisyTune (``REGULARISER_ROWS``)."""
    import dataclasses

    base = base or MethodOptions()
    grid = {name: dataclasses.replace(base, method=name) for name in ("std", "r3f", "r4f")}
    if r3f_variants:
        grid["r3f-nograd"] = dataclasses.replace(base, method="r3f", r3f_noised_no_grad=True)
        grid["r3f-2b"] = dataclasses.replace(base, method="r3f", r3f_concat_batch=True)
        grid["r3f-2pass"] = dataclasses.replace(base, method="r3f", r3f_concat_batch=False)
    for s in smart_steps:
        grid[f"smart{s}"] = dataclasses.replace(base, method="smart", smart_steps=s)
    for k in freelb_steps:
        grid[f"freelb{k}"] = dataclasses.replace(base, method="freelb", freelb_steps=k)
    if regularisers:
        for name, overrides in REGULARISER_ROWS.items():
            grid[name] = dataclasses.replace(base, **overrides)
    return grid


def random_batch(batch_size: int, seq_len: int, vocab_size: int, device: str, num_labels: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab_size // 2), vocab_size, (batch_size, seq_len), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=g).to(device),
    }


SIZES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def build_model(model: str | None = None, config: str = "minilm", trust_remote_code: bool = False) -> torch.nn.Module:
    """A sequence classifier: ``model`` (hub name or folder), the embedded MiniLM
    (``config="minilm"``), or a randomly initialised BERT of ``SIZES[config]``."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    if model is None and config == "minilm":
        from rxf.defaults import default_model_path

        model = default_model_path()
    if model is not None:
        return AutoModelForSequenceClassification.from_pretrained(model, num_labels=2, trust_remote_code=trust_remote_code)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(BertConfig(vocab_size=30522, num_labels=2, **SIZES[config]))
