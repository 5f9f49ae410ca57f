"""GPU checks: every method through RXFTrainer under bf16 and fp16 (with its gradient
scaler) on a small random BERT, reporting whether losses, regularisers and gradients stay
finite and the loss falls; that no update makes the host wait for the GPU (CUDA's sync
debug mode set to error); and that the fused no-bias-correction AdamW computes the
formula. Needs a CUDA device; never part of the test suite.

    python scripts/gpu_smoke.py            # everything
    python scripts/gpu_smoke.py --checks   # the sync and optimiser checks only
"""

import math
import sys
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, default_data_collator

from rxf import METHODS, RXFConfig, RXFTrainer
from rxf.experiments.cost import UpdateRunner, random_batch
from rxf.methods import MethodOptions
from rxf.optim import AdamWNoBiasCorrection


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


def host_syncs() -> None:
    """Each method's update (forward, backward, optimiser step; SMART's teacher update)
    with CUDA's sync debug mode set to warn: every host-device synchronisation is
    recorded with the Python line that caused it."""
    import warnings

    config = BertConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config).cuda()
    batch = random_batch(8, 32, 1024, "cuda")
    batch["attention_mask"][:, 24:] = 0  # padding, so that the masks are exercised
    print("| method | host syncs in one update (file:line, count) |")
    print("|---|---|")
    for method in METHODS:
        runner = UpdateRunner(method, MethodOptions(method=method), model, batch)
        runner.update()  # the first update creates the optimiser state
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                runner.update()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        places: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                where = f"{'/'.join(w.filename.split('/')[-2:])}:{w.lineno}"
                places[where] = places.get(where, 0) + 1
        print(f"| {method} | {', '.join(f'{k} ({v})' for k, v in places.items()) or 'none'} |")


def fused_optimizer() -> None:
    """AdamWNoBiasCorrection picks PyTorch's fused kernel for CUDA parameters; three steps of
    it against the formula in float64 on the host."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")), torch.nn.Parameter(torch.randn(7, device="cuda"))]
    expected = [p.detach().double().cpu() for p in params]
    moments = [(torch.zeros_like(e), torch.zeros_like(e)) for e in expected]
    opt = AdamWNoBiasCorrection(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            g = g.double().cpu()
            m, v = moments[i]
            m.mul_(0.9).add_(0.1 * g)
            v.mul_(0.999).add_(0.001 * g * g)
            expected[i] = expected[i] * (1 - 1e-2 * 0.1) - 1e-2 * m / (v.sqrt() + 1e-8)
    error = max((p.detach().double().cpu() - e).abs().max().item() for p, e in zip(params, expected))
    print(f"AdamWNoBiasCorrection on CUDA: fused={opt.param_groups[0]['fused']}, max |error| vs formula = {error:.2e}")


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    fused_optimizer()
    host_syncs()
    if "--checks" in sys.argv:
        return
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
