"""The examples, PEFT/LoRA with R4F, TensorBoard logging, and shared sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_experiments import TINY_RUN, glue_like  # noqa: F401  (fixture)
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


def test_two_sweep_workers_share_one_budget(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    import optuna
    from optuna.trial import TrialState

    out = tmp_path / "sweep"
    out.mkdir()
    storage = f"sqlite:///{out / 'shared.db'}"
    args = [sys.executable, "-m", "rxf.cli", "sweep", "--tasks", "sst2", "--methods", "r3f", "--budget", "4",
            "--storage", storage, "--model", str(tiny_checkpoint), "--data-dir", str(glue_like),
            "--space", '{"learning_rate": [1e-3, 5e-4, 3e-4, 1e-4, 5e-5], "r3f_lambda": [0.1, 0.5, 1.0, 5.0]}', *TINY_RUN]
    workers = [subprocess.Popen([*args, "--output-dir", str(out / f"w{i}"), "--sampler-seed", str(i)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}) for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="sst2-r3f", storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    assert len({t.number for t in complete}) == 4
    assert not study.get_trials(states=(TrialState.RUNNING,))
    best = [json.loads((out / f"w{i}" / "best_configs.json").read_text()) for i in range(2)]
    assert any(b["sst2"]["r3f"]["trials"] == 4 for b in best)


def test_open_study_retries_when_another_worker_is_creating_the_schema(tmp_path, monkeypatch):
    """Two workers on a new database race to create Optuna's schema; the loser's error
    (here raised once, as CI saw it) must turn into a retry that loads the study."""
    import optuna
    import sqlalchemy.exc

    from rxf.experiments import sweep

    real, calls = optuna.create_study, []

    def racing(**kwargs):
        calls.append(kwargs["study_name"])
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(**kwargs)

    monkeypatch.setattr(optuna, "create_study", racing)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    study = sweep.open_study("sst2-r3f", f"sqlite:///{tmp_path / 'shared.db'}")
    assert calls == ["sst2-r3f", "sst2-r3f"] and study.study_name == "sst2-r3f"
    monkeypatch.setattr(optuna, "create_study", lambda **kw: (_ for _ in ()).throw(
        sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception("database is locked"))))
    with pytest.raises(sqlalchemy.exc.OperationalError):  # a lasting failure still surfaces
        sweep.open_study("sst2-r3f", f"sqlite:///{tmp_path / 'shared.db'}", attempts=2)
