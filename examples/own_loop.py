"""R3F (or any rxf method) in your own PyTorch loop, with the functional API.

    python examples/own_loop.py --method r3f
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rxf import MethodOptions, build_method
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
    method = build_method(options, model)
    method.setup(model)  # R4F normalises the head here, before the optimiser holds the weights
    optimizer = adamw(model.parameters(), bias_correction=options.resolved_bias_correction(), lr=1e-4)

    data = tokenize(load_local(DEMO_TASK, DEMO_DATA)["train"], tokenizer, max_length=32)
    loader = DataLoader(data, batch_size=16, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer))
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            optimizer.zero_grad()
            loss, logs = method.step(model, batch)  # the loss and its backward (FreeLB: K of each)
            optimizer.step()
            step += 1
            method.after_step(model, step, args.steps)  # SMART moves its teacher
            if step % 10 == 0 or step == args.steps:
                extra = f", regularizer {float(logs['regularizer']):.2e}" if "regularizer" in logs else ""
                print(f"step {step}: task loss {float(logs['task_loss']):.4f}{extra}")
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
