"""R3F (or any rxf method) in your own PyTorch loop, with the functional API.

    python examples/own_loop.py --method r3f
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rxf import EMATeacher, MethodOptions, apply_spectral_norm, freelb_step, method_loss
from rxf.demo import DEMO_DATA, DEMO_TASK
from rxf.optim import adamw
from rxf.tasks.loading import load_local
from rxf.tasks.tokenize import tokenize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder or hub name (default: the embedded MiniLM)")
    parser.add_argument("--method", default="r3f")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.model is None:
        from rxf.defaults import default_model_path

        args.model = default_model_path()

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    options = MethodOptions(method=args.method)
    if options.method == "r4f":
        apply_spectral_norm(model, options.r4f_scope)
    teacher = EMATeacher(model, options) if options.method == "smart" else None
    optimizer = adamw(model.parameters(), bias_correction=options.resolved_bias_correction(), lr=1e-4)

    data = tokenize(load_local(DEMO_TASK, DEMO_DATA)["train"], tokenizer, max_length=32)
    loader = DataLoader(data, batch_size=16, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer))
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            optimizer.zero_grad()
            if options.method == "freelb":  # runs its own K backward calls
                loss, logs = freelb_step(model, batch, options)
            else:  # r3f_loss, smart_loss or standard_loss, as options.method says
                loss, logs = method_loss(model, batch, options, teacher)
                loss.backward()
            optimizer.step()
            if teacher is not None:
                teacher.update(model, step, args.steps)
            step += 1
            if step % 10 == 0 or step == args.steps:
                extra = f", regularizer {float(logs['regularizer']):.2e}" if "regularizer" in logs else ""
                print(f"step {step}: task loss {float(logs['task_loss']):.4f}{extra}")
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
