"""R3F in an Accelerate loop: the same script runs on a CPU, one GPU, or many through
``accelerate launch``.

    python examples/accelerate_train.py
    accelerate launch --num_processes 2 examples/accelerate_train.py
"""

import argparse

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rxf import MethodOptions, r3f_loss
from rxf.demo import DEMO_DATA, DEMO_TASK
from rxf.tasks.loading import load_local
from rxf.tasks.tokenize import tokenize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder or hub name (default: the embedded MiniLM)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.model is None:
        from rxf.defaults import default_model_path

        args.model = default_model_path()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = tokenize(load_local(DEMO_TASK, DEMO_DATA)["train"], tokenizer, max_length=32)
    loader = DataLoader(data, batch_size=16, shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    options = MethodOptions(method="r3f")

    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            loss, logs = r3f_loss(model, batch, options)  # the DDP wrapper is handled inside
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if accelerator.is_main_process and (step % 10 == 0 or step == args.steps):
                print(f"step {step}: task loss {float(logs['task_loss']):.4f}, regularizer {float(logs['regularizer']):.2e}")
            if step == args.steps:
                break
    accelerator.end_training()  # tears down the process group before interpreter exit


if __name__ == "__main__":
    main()
