"""The examples, PEFT/LoRA with R4F, and TensorBoard logging (shared sweeps: test_sweep.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, default_data_collator

from rxf import RXFConfig, RXFTrainer
from rxf.methods.r4f import normalised_linears, refresh_spectral_norm

ROOT = Path(__file__).resolve().parents[1]


def run_example(*args, timeout=600):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("method", ["r3f", "smart", "freelb", "r4f"])
def test_own_loop_example(tiny_checkpoint, method):
    out = run_example("examples/own_loop.py", "--model", str(tiny_checkpoint), "--method", method, "--steps", "10")
    assert "step 10: task loss" in out


def test_accelerate_example(tiny_checkpoint):
    out = run_example("examples/accelerate_train.py", "--model", str(tiny_checkpoint), "--steps", "10")
    assert "step 10: task loss" in out and "regularizer" in out


def test_lora_with_r4f_trains_adapters_and_head_and_reloads(tiny_checkpoint, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    from peft_r3f import build, reload

    from rxf.demo import DEMO_DATA, DEMO_TASK
    from rxf.tasks.loading import load_local
    from rxf.tasks.tokenize import tokenize

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = build(str(tiny_checkpoint), lora_rank=4)
    config = RXFConfig(output_dir=str(tmp_path), method="r4f", max_steps=8, learning_rate=5e-3, save_strategy="no",
                       report_to="none", per_device_train_batch_size=16, disable_tqdm=True)
    data = tokenize(load_local(DEMO_TASK, DEMO_DATA)["train"].head(64), tokenizer, 32)
    from transformers import DataCollatorWithPadding

    trainer = RXFTrainer(model=model, args=config, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed), changed
    assert any("lora_" in n for n in changed) and any("modules_to_save" in n for n in changed)

    model.eval()
    refresh_spectral_norm(model)
    trained_head = [(n, m) for n, m in normalised_linears(model) if "modules_to_save" in n]
    assert trained_head
    for name, linear in trained_head:
        assert torch.linalg.matrix_norm(linear.weight, ord=2).item() <= 1 + 1e-3, name

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = reload(str(tiny_checkpoint), str(tmp_path / "adapter")).eval()
    batch = tokenizer(["a fine day", "it broke at once"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_tensorboard_gets_the_regularizer(tmp_path):
    from conftest import tiny_model
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_training import OPTIONS, ToyDataset

    config = RXFConfig(output_dir=str(tmp_path), method="r3f", max_steps=4, logging_steps=1, save_strategy="no",
                       report_to=["tensorboard"], per_device_train_batch_size=8,
                       disable_tqdm=True, **OPTIONS)
    RXFTrainer(model=tiny_model(), args=config, train_dataset=ToyDataset(), data_collator=default_data_collator).train()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/regularizer", "train/task_loss", "train/forward_passes"} <= tags
