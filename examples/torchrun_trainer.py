"""RXFTrainer under torchrun / accelerate launch (DDP), or in one process.

    torchrun --nproc_per_node 2 examples/torchrun_trainer.py --method r3f --output-dir out
    accelerate launch --num_processes 2 examples/torchrun_trainer.py --method freelb --output-dir out
    python examples/torchrun_trainer.py --method r3f --output-dir out --batch-size 8

The Trainer (through Accelerate) wraps the model in DistributedDataParallel; rxf runs
FreeLB's first K-1 backward calls under no_sync and SMART's ascent steps take gradients
with respect to the perturbation only, so each update all-reduces once. With
``--count-allreduce`` a DDP communication hook counts the all-reduces per update.
``--batch-size`` is per process: 2 processes x 4 = one process x 8.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainerCallback

from rxf import RXFConfig, RXFTrainer
from rxf.demo import DEMO_DATA, DEMO_TASK
from rxf.tasks.loading import load_local
from rxf.tasks.tokenize import tokenize


class CountAllReduce(TrainerCallback):
    """Registers a DDP communication hook that counts bucket all-reduces."""

    def __init__(self, trainer):
        self.trainer, self.calls, self.registered = trainer, 0, False

    def on_step_begin(self, args, state, control, **kwargs):  # the model is wrapped by now
        ddp = self.trainer.model_wrapped
        if not self.registered and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            self.registered = True
            def hook(process_group, bucket):
                self.calls += 1
                return torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook(process_group, bucket)

            ddp.register_comm_hook(None, hook)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder or hub name (default: the embedded MiniLM)")
    parser.add_argument("--method", default="r3f", help="a method, or several separated by commas (run in turn)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--count-allreduce", action="store_true")
    args = parser.parse_args()

    if args.model is None:
        from rxf.defaults import default_model_path

        args.model = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_local(DEMO_TASK, DEMO_DATA)
    train = tokenize(data["train"].head(args.samples), tokenizer, max_length=32)
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if args.no_dropout else {}
    for method in args.method.split(","):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, **overrides)
        out = Path(args.output_dir) / method
        config = RXFConfig(
            output_dir=str(out), method=method, per_device_train_batch_size=args.batch_size,
            max_steps=args.max_steps, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
            freelb_init_mag=0.0, freelb_step_size=0.05, seed=0,
            # Accelerate runs DDP over gloo on CPUs only when told to use the CPU.
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = RXFTrainer(model=model, args=config, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer))
        counter = CountAllReduce(trainer)
        if args.count_allreduce:
            trainer.add_callback(counter)
        trainer.train()
        if trainer.is_world_process_zero():
            trainer.save_model(str(out / "final"))
            losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            report = {"losses": losses, "allreduce_calls": counter.calls, "updates": trainer.state.global_step,
                      "world_size": dist.get_world_size() if dist.is_initialized() else 1}
            (out / "run.json").write_text(json.dumps(report))
    if dist.is_initialized():
        # Left for interpreter exit, gloo's threads outlive Python and a rank aborts
        # ("terminate called without an active exception") after a run that succeeded.
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
