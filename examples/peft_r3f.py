"""R4F (or R3F) on a LoRA model with PEFT: only the adapters and the task head train,
the spectrally normalised head survives the adapter wrapper, and the adapter saves and
reloads with PEFT's own ``from_pretrained``.

    python examples/peft_r3f.py --output-dir out/peft --method r4f
"""

import argparse
from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rxf import RXFConfig, RXFTrainer
from rxf.demo import DEMO_DATA, DEMO_TASK
from rxf.tasks.loading import load_local
from rxf.tasks.tokenize import tokenize


def build(model_path: str, lora_rank: int):
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_rank, lora_alpha=2 * lora_rank,
                        target_modules=["query", "value"], lora_dropout=0.0)
    return get_peft_model(base, config)


def reload(model_path: str, adapter_dir: str):
    """The base model plus the saved adapter and head, through PEFT alone."""
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    return PeftModel.from_pretrained(base, adapter_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder or hub name (default: the embedded MiniLM)")
    parser.add_argument("--method", default="r4f")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()
    if args.model is None:
        from rxf.defaults import default_model_path

        args.model = default_model_path()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_local(DEMO_TASK, DEMO_DATA)
    model = build(args.model, args.lora_rank)
    model.print_trainable_parameters()
    config = RXFConfig(output_dir=args.output_dir, method=args.method, max_steps=args.max_steps, learning_rate=1e-3,
                       per_device_train_batch_size=16, save_strategy="no", report_to="none", logging_steps=5)
    trainer = RXFTrainer(model=model, args=config, train_dataset=tokenize(data["train"], tokenizer, 32),
                         data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    adapter = Path(args.output_dir) / "adapter"
    trainer.save_model(str(adapter))  # adapter weights and the head (modules_to_save)
    print(f"saved the adapter and head to {adapter}; reload with PeftModel.from_pretrained")


if __name__ == "__main__":
    main()
