"""``rxf finetune`` end to end: results.json, determinism, resume after SIGKILL, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from rxf.cli import main
from rxf.demo import DEMO_DATA

RESULT_FIELDS = {
    "task", "method", "seed", "config", "best", "final", "seconds_to_best", "train_seconds", "updates",
    "passes_per_update", "versions", "hardware",
}


def finetune_args(model, out, *extra):
    # The bundled demo data has SST-2's layout (sentence, label 0/1).
    return ["finetune", "--task", "sst2", "--model", str(model), "--data-dir", str(DEMO_DATA),
            "--output-dir", str(out), "--batch-size", "16", "--max-length", "48", "--learning-rate", "1e-3",
            "--no-progress", *extra]


def test_finetune_writes_results_and_a_loadable_best_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    assert main(finetune_args(tiny_checkpoint, out, "--method", "r4f", "--epochs", "2",
                              "--max-train-samples", "96", "--max-eval-samples", "40")) == 0
    results = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(results)
    assert results["method"] == "r4f" and results["updates"] == 12
    assert results["passes_per_update"] == {"forward": 2, "backward": 1}
    assert 0 <= results["best"]["dev"]["accuracy"] <= 1 and results["config"]["r4f_scope"] == "all"
    assert results["seconds_to_best"] <= results["train_seconds"]
    assert results["data"]["train"]["examples"] == 96 and results["data"]["dev"]["examples"] == 40
    model, info = AutoModelForSequenceClassification.from_pretrained(out / "best", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "best" / "model.safetensors").is_file()
    # A finished run is not trained again.
    before = (out / "results.json").stat().st_mtime_ns
    assert main(finetune_args(tiny_checkpoint, out, "--method", "r4f", "--epochs", "2",
                              "--max-train-samples", "96", "--max-eval-samples", "40")) == 0
    assert (out / "results.json").stat().st_mtime_ns == before


def test_a_run_folder_is_refused_under_another_number_of_processes(tiny_checkpoint, tmp_path, capsys,
                                                                    monkeypatch):
    """--batch-size is per process: a run resumed or rerun under torchrun with another
    process count is another run (another batch per update), refused before anything
    trains. A folder recorded before rxf kept the count is taken as one process's run."""
    out = tmp_path / "run"
    args = finetune_args(tiny_checkpoint, out, "--max-steps", "2", "--max-train-samples", "32",
                         "--max-eval-samples", "16")
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["processes"] == 1
    before = (out / "results.json").stat().st_mtime_ns
    monkeypatch.setenv("WORLD_SIZE", "2")
    capsys.readouterr()
    assert main(args) == 2
    assert "processes (1 there, 2 now)" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    del record["processes"]
    (out / "run.json").write_text(json.dumps(record))
    assert main(args) == 0
    assert (out / "results.json").stat().st_mtime_ns == before


def test_same_seed_gives_identical_metrics(tiny_checkpoint, tmp_path):
    runs = []
    for name in ("a", "b"):
        args = finetune_args(tiny_checkpoint, tmp_path / name, "--method", "r3f", "--max-steps", "8",
                             "--max-train-samples", "64", "--max-eval-samples", "32", "--seed", "7")
        assert main(args) == 0
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[0]["history"][-1]["eval_dev_loss"] == runs[1]["history"][-1]["eval_dev_loss"]
    assert runs[0]["best"] == runs[1]["best"]


def test_resumes_after_sigkill(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "rxf.cli", *finetune_args(
        tiny_checkpoint, out, "--method", "std", "--epochs", "15", "--max-train-samples", "160",
        "--max-eval-samples", "16", "--eval-steps", "10")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    first = out / "checkpoints" / "checkpoint-20" / "trainer_state.json"
    deadline = time.time() + 240
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists()

    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "rxf: resuming from" in rerun.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["updates"] == 150
    steps = [e["step"] for e in results["history"]]
    assert steps[0] == 10 and steps[-1] == 150  # history from before the kill is kept
    assert results["train_seconds"] > 0


@pytest.mark.parametrize(
    "files, extra, message",
    [
        ({"train.tsv": "sentence\tlabel\na\t1\nb\t0\tx\n", "dev.tsv": "sentence\tlabel\nc\t1\n"}, [],
         "train.tsv:3: expected 2 tab-separated fields, found 3"),
        ({"train.tsv": "sentence\tlabel\na\t1\nb\tpositive\n", "dev.tsv": "sentence\tlabel\nc\t1\n"}, [],
         "train.tsv:3: label 'positive' is not one of 0, 1"),
        ({"train.tsv": "", "dev.tsv": "sentence\tlabel\nc\t1\n"}, [], "train.tsv: empty file"),
        ({"train.tsv": "sentence\tlabel\na\t1\n"}, [], "no dev split for sst2"),
        ({"train.tsv": "sentence\tlabel\na\t1\n", "dev.tsv": "sentence\tlabel\nc\t1\n"}, ["--r3f-lambda", "-1"],
         "--r3f-lambda"),
    ],
)
def test_bad_input_fails_cleanly(tiny_checkpoint, tmp_path, capsys, files, extra, message):
    data = tmp_path / "data"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_text(content)
    out = tmp_path / "out"
    code = main(["finetune", "--task", "sst2", "--model", str(tiny_checkpoint), "--data-dir", str(data),
                 "--output-dir", str(out), "--no-progress", *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_non_numeric_stsb_score_fails_cleanly(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "STS-B"
    data.mkdir()
    (data / "train.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\tn/a\n")
    (data / "dev.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1.0\n")
    out = tmp_path / "out"
    assert main(["finetune", "--task", "stsb", "--model", str(tiny_checkpoint), "--data-dir", str(tmp_path),
                 "--output-dir", str(out)]) == 2
    assert "train.tsv:3: score 'n/a' is not a number" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--task", "sst-2"), ("--method", "adversarial")])
def test_unknown_task_or_method_is_refused(tmp_path, capsys, flag, value):
    args = ["finetune", "--task", "sst2", "--method", "std", "--output-dir", str(tmp_path / "out")]
    args[args.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err
    assert err.count("\n") == 1 and "usage:" not in err  # one line, not the usage of every option first
    assert not (tmp_path / "out").exists()


def test_an_unknown_option_is_named_by_its_subcommand(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--task", "sst2", "--output-dir", str(tmp_path / "out"), "--bogus", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "rxf finetune: error: unrecognized arguments: --bogus 3 (see rxf finetune --help)\n"


@pytest.mark.parametrize("args, message", [
    # Two copies of one run would train in one folder at once (--jobs) and race each other.
    (["compare", "--tasks", "sst2,sst2", "--methods", "std"], "--tasks: 'sst2' is given twice"),
    (["compare", "--tasks", "sst2", "--methods", "std,r3f,std"], "--methods: 'std' is given twice"),
    (["compare", "--tasks", "sst2", "--methods", "std", "--seeds", "1,2,1"], "--seeds: 1 is given twice"),
    (["chain", "--tasks", "sst2,rte,sst2"], "--tasks: 'sst2' is given twice"),
    # A folder for a task outside the chain (a typo) would leave that task on --data-dir.
    (["chain", "--tasks", "sst2,qnli", "--task-data", "qnl=x"], "--task-data: 'qnl' is not one of --tasks (sst2, qnli)"),
    (["cycle", "--tasks", "sst2,rte", "--task-data", "sst2=x,mrpc=y"], "--task-data: 'mrpc' is not one of --tasks"),
    (["probe", "--tasks", "rte", "--task-data", "sst2=x"], "--task-data: 'sst2' is not one of --tasks (rte)"),
    (["chain", "--tasks", "sst2,rte", "--task-epochs", "qnli=3"], "--task-epochs: 'qnli' is not one of --tasks"),
    (["chain", "--tasks", "sst2,rte", "--task-epochs", "rte=0"], "--task-epochs: rte=0 is not a positive number"),
    (["cycle", "--tasks", "sst2,rte", "--task-epochs", "rte=three"], "--task-epochs: rte=three is not a positive"),
    (["chain", "--tasks", "sst2,rte", "--task-epochs", "rte=nan"], "--task-epochs: rte=nan is not a positive"),
    (["chain", "--tasks", "sst2,rte", "--task-epochs", "rte=3", "--task-epochs", "rte=2"],
     "--task-epochs: 'rte' is given twice"),
    (["probe", "--checkpoint", "a=x,a=y"], "--checkpoint: 'a' is given twice"),
    # Every method is checked before the first one trains the real model.
    (["demo", "--methods", "std,foo"], "--methods: unknown method 'foo'"),
    (["cost", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["cost", "--smart-steps", "0"], "--smart-steps: step counts must be >= 1"),
    (["cost", "--device", "foo"], "--device: 'foo' is not a device"),
    (["cost", "--device", "cuda"], "sees no CUDA device"),
])
def test_lists_and_cost_options_are_checked_before_anything_runs(tmp_path, capsys, args, message):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    assert main([*args, "--output-dir", str(tmp_path / "out")] if args[0] != "cost" else args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_is_refused(tmp_path, capsys):
    assert main(["finetune", "--task", "rte", "--data-dir", str(tmp_path / "nowhere"),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.real
def test_issue_command_on_real_rte_with_minilm(data_dir, minilm_path, tmp_path):
    """The README's example: real RTE, the embedded MiniLM, R3F, one epoch on the CPU."""
    out = tmp_path / "OUT"
    assert main(["finetune", "--task", "rte", "--method", "r3f", "--data-dir", str(data_dir / "glue"),
                 "--max-train-samples", "256", "--max-eval-samples", "128", "--epochs", "1",
                 "--output-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(results)
    assert results["updates"] == 8 and results["data"]["dev"]["examples"] == 128
    assert Path(results["model"]) == minilm_path


def test_a_run_prints_one_bar_one_line_per_evaluation_and_no_library_noise(tiny_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "rxf.cli", *finetune_args(tiny_checkpoint, tmp_path / "run", "--method", "r3f",
                                                            "--max-steps", "4", "--eval-steps", "2",
                                                            "--max-train-samples", "32", "--max-eval-samples", "16")]
    args.remove("--no-progress")
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    output = run.stdout + run.stderr
    for noise in ("LOAD REPORT", "\x1b[", "pin_memory", "'eval_dev_loss'", "Writing model shards", "Saving the dataset"):
        assert noise not in output, noise
    assert output.count("rxf: new weights, initialised at random (the task head): classifier.bias, classifier.weight") == 1
    assert "update 2/4: dev loss" in output and "update 4/4: dev loss" in output
    assert "regularizer=" in run.stderr  # the bar shows the loss terms
    assert "| dev |" in run.stdout
