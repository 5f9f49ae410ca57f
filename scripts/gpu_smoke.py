"""GPU check of the mixed-precision paths: every method through RXFTrainer under bf16
and fp16 (with its gradient scaler) on a small random BERT, reporting whether losses,
regularisers and gradients stay finite and the loss falls. Needs a CUDA device; never
part of the test suite.

    python scripts/gpu_smoke.py
"""

import math
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, default_data_collator

from rxf import METHODS, RXFConfig, RXFTrainer


class Toy(torch.utils.data.Dataset):
    """Separable: class 0 draws tokens from 10..509, class 1 from 510..1009."""

    def __init__(self, n=512, length=32):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 2
        self.ids = 10 + 500 * self.labels[:, None] + torch.randint(0, 500, (n, length), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| precision | method | first task loss | last task loss | last regularizer | all finite |")
    print("|---|---|---|---|---|---|")
    for precision in ("bf16", "fp16"):
        for method in METHODS:
            torch.manual_seed(0)
            config = BertConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=1024, num_labels=2)
            model = AutoModelForSequenceClassification.from_config(config)
            with tempfile.TemporaryDirectory() as out:
                args = RXFConfig(
                    output_dir=out, method=method, per_device_train_batch_size=32, max_steps=40,
                    learning_rate=3e-4, logging_steps=5, save_strategy="no", report_to="none",
                    bf16=precision == "bf16", fp16=precision == "fp16", disable_tqdm=True,
                    freelb_step_size=0.01, noise_eps=1e-5,
                )
                trainer = RXFTrainer(model=model, args=args, train_dataset=Toy(), data_collator=default_data_collator)
                trainer.train()
            logs = [e for e in trainer.state.log_history if "task_loss" in e]
            values = [v for e in logs for k, v in e.items() if isinstance(v, float)]
            finite = all(math.isfinite(v) for v in values) and all(
                torch.isfinite(p).all() for p in model.parameters()
            )
            reg = logs[-1].get("regularizer", float("nan"))
            print(f"| {precision} | {method} | {logs[0]['task_loss']:.4f} | {logs[-1]['task_loss']:.4f} | "
                  f"{reg:.3g} | {finite} |")


if __name__ == "__main__":
    main()
