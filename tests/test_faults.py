"""Trustworthy runs: every path that once gave a wrong or stale number with exit status 0,
or a traceback instead of one line, end to end through ``rxf finetune``.

Each test here failed on commit 5bbcb6b. The data are the bundled demo data (SST-2's
layout) with the tiny random BERT of conftest, except the STS-B run, which uses the real
data and the embedded MiniLM.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rxf.cli import main
from rxf.demo import DEMO_DATA
from rxf.trainer import RXFTrainer


def finetune(model, out, *extra, data=DEMO_DATA):
    return ["finetune", "--task", "sst2", "--model", str(model), "--data-dir", str(data),
            "--output-dir", str(out), "--batch-size", "16", "--max-length", "32", "--learning-rate", "1e-3",
            "--max-train-samples", "64", "--max-eval-samples", "32", "--no-progress", *extra]


def strict_json(path: Path):
    def refuse(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def one_line_error(capsys, *words, alone=True):
    """The run's error: one line, the last one, no traceback; ``alone``: nothing else was
    printed (a refusal before training), else progress lines of a run that trained may
    come before it."""
    err = capsys.readouterr().err.strip()
    assert not alone or err.count("\n") == 0, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], err
    return errors[0]


# --- 1. STS-B, a regression task, end to end ---------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("method", ["std", "r3f"])
def test_stsb_trains_end_to_end_with_minilm(data_dir, minilm_path, tmp_path, method):
    from scipy.stats import pearsonr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / method
    assert main(["finetune", "--task", "stsb", "--method", method, "--data-dir", str(data_dir / "glue"),
                 "--max-train-samples", "64", "--max-eval-samples", "48", "--max-steps", "4", "--batch-size", "16",
                 "--max-length", "64", "--learning-rate", "5e-5", "--output-dir", str(out), "--no-progress"]) == 0
    results = strict_json(out / "results.json")
    assert results["passes_per_update"]["forward"] == (2 if method == "r3f" else 1)
    best = results["best"]["dev"]
    # The reported score, recomputed from the saved model with an independent formula.
    model = AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    rows = [line.split("\t") for line in (data_dir / "glue/STS-B/dev.tsv").read_text().splitlines()[1:49]]
    encoded = tokenizer([r[7] for r in rows], [r[8] for r in rows], truncation=True, max_length=64,
                        padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoded).logits.squeeze(-1).numpy()
    scores = np.array([float(r[9]) for r in rows])
    assert math.isfinite(best["pearson"])
    assert best["pearson"] == pytest.approx(pearsonr(predicted, scores)[0], abs=1e-4)
    assert best["loss"] == pytest.approx(float(np.mean((predicted - scores) ** 2)), rel=1e-4)


# --- 2. Stale results: a folder holds one run ----------------------------------------------

def test_a_rerun_with_other_options_or_data_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "4")) == 0
    results = (out / "results.json").read_text()
    capsys.readouterr()

    assert main(finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "4")) == 0  # the same run
    assert (out / "results.json").read_text() == results
    capsys.readouterr()
    for extra, named in ((["--method", "r3f", "--max-steps", "4"], "method"),
                         (["--method", "std", "--max-steps", "4", "--seed", "7"], "seed"),
                         (["--method", "std", "--max-steps", "4", "--learning-rate", "2e-3"], "learning_rate")):
        assert main(finetune(tiny_checkpoint, out, *extra)) == 2
        one_line_error(capsys, named, "--overwrite")
    # The same options on other data (one label changed in a copy of the demo data).
    data = tmp_path / "data"
    shutil.copytree(DEMO_DATA, data)
    lines = (data / "train.tsv").read_text().splitlines()
    text, label = lines[1].rsplit("\t", 1)
    lines[1] = f"{text}\t{1 - int(label)}"
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    args = finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "4", data=DEMO_DATA)
    args[args.index("--data-dir") + 1] = str(data)
    assert main(args) == 2
    one_line_error(capsys, "data.train", "--overwrite")
    assert (out / "results.json").read_text() == results
    assert main([*args, "--overwrite"]) == 0
    assert (out / "results.json").read_text() != results


def test_a_model_changed_in_place_is_another_run(tiny_checkpoint, tmp_path, capsys):
    """The model's path is not its identity: weights replaced at the same path (a folder
    retrained in place, a chain's earlier stage run again) must not return the old results."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    out = tmp_path / "run"
    assert main(finetune(model, out, "--max-steps", "2")) == 0
    results = (out / "results.json").read_text()
    capsys.readouterr()
    from safetensors.torch import load_file, save_file

    original = (model / "model.safetensors").read_bytes()
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert main(finetune(model, out, "--max-steps", "2")) == 2
    one_line_error(capsys, "model_files", "--overwrite")
    assert (out / "results.json").read_text() == results
    (model / "model.safetensors").write_bytes(original)
    for file, old, new in (("config.json", '"hidden_dropout_prob": 0.1', '"hidden_dropout_prob": 0.5'),
                           ("tokenizer_config.json", '"do_lower_case": true', '"do_lower_case": false')):
        text = (model / file).read_text()
        assert old in text
        (model / file).write_text(text.replace(old, new))
        assert main(finetune(model, out, "--max-steps", "2")) == 2  # a model that computes something else
        one_line_error(capsys, "model_files")
        (model / file).write_text(text)
    # A run recorded before rxf kept the fingerprint is taken as made from this model.
    record = json.loads((out / "run.json").read_text())
    del record["model_files"]
    (out / "run.json").write_text(json.dumps(record))
    assert main(finetune(model, out, "--max-steps", "2")) == 0
    assert (out / "results.json").read_text() == results


class Killed(BaseException):
    """Stands in for a kill right after a checkpoint was written."""


def interrupt_after_checkpoint(monkeypatch, step):
    original = RXFTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == step:
            raise Killed

    monkeypatch.setattr(RXFTrainer, "_save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(RXFTrainer, "_save_checkpoint", original)


def test_a_partly_trained_run_is_not_resumed_with_other_options(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    restore = interrupt_after_checkpoint(monkeypatch, 2)
    with pytest.raises(Killed):
        main(finetune(tiny_checkpoint, out, "--method", "r3f", "--max-steps", "6", "--eval-steps", "2"))
    restore()
    capsys.readouterr()
    assert main(finetune(tiny_checkpoint, out, "--method", "r3f", "--r3f-lambda", "0.5", "--max-steps", "6",
                         "--eval-steps", "2")) == 2
    one_line_error(capsys, "r3f_lambda", "--overwrite")
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # nothing of the run was lost


# --- 3. Resume = the unbroken run, for every method ----------------------------------------

METHOD_FLAGS = {
    "std": [], "std++": [], "r3f": ["--noise-eps", "1e-2"], "r4f": ["--noise-eps", "1e-2"],
    "smart": ["--smart-epsilon", "1e-2", "--smart-step-size", "1e-2"],
    "freelb": ["--freelb-init-mag", "0.05", "--freelb-step-size", "0.05", "--freelb-steps", "2"],
}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_a_resumed_run_ends_where_the_unbroken_run_ends(tiny_checkpoint, tmp_path, monkeypatch, method):
    args = ["--method", method, *METHOD_FLAGS[method], "--max-steps", "8", "--eval-steps", "2", "--keep-checkpoints"]
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    assert main(finetune(tiny_checkpoint, unbroken, *args)) == 0

    restore = interrupt_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Killed):
        main(finetune(tiny_checkpoint, resumed, *args))
    restore()
    assert not (resumed / "results.json").exists()
    assert main(finetune(tiny_checkpoint, resumed, *args)) == 0

    a, b = strict_json(unbroken / "results.json"), strict_json(resumed / "results.json")
    length = 16 if method == "std++" else 8  # STD++ trains twice as long
    assert a["updates"] == b["updates"] == length
    assert [e["step"] for e in b["history"]] == list(range(2, length + 1, 2))
    for x, y in zip(a["history"], b["history"]):
        assert y["eval_dev_loss"] == pytest.approx(x["eval_dev_loss"], abs=1e-6)
    assert a["best_step"] == b["best_step"]
    weights_a, weights_b = load_file(unbroken / "best" / "model.safetensors"), load_file(resumed / "best" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=1e-6, rtol=0, msg=name)
    # The last checkpoints hold the same training state (raw head, power-iteration
    # vectors, SMART's teacher).
    state_a = load_file(unbroken / "checkpoints" / f"checkpoint-{length}" / "rxf_method_state.safetensors")
    state_b = load_file(resumed / "checkpoints" / f"checkpoint-{length}" / "rxf_method_state.safetensors")
    assert state_a.keys() == state_b.keys()
    if method in ("r4f", "smart"):
        assert len(state_a) > 1
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], atol=1e-6, rtol=0, msg=name)


def test_r4f_checkpoints_hold_the_raw_weights_and_load_as_plain_models(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    assert main(finetune(tiny_checkpoint, out, "--method", "r4f", "--max-steps", "4", "--eval-steps", "2",
                         "--keep-checkpoints")) == 0
    checkpoint = out / "checkpoints" / "checkpoint-4"
    state = load_file(checkpoint / "rxf_method_state.safetensors")
    folded = load_file(checkpoint / "model.safetensors")["classifier.weight"]
    raw, u, v = (state[f"classifier.weight_{k}"] for k in ("original", "u", "v"))
    # The folded weight is W / sigma, with sigma the estimate u^T W v of the power iteration.
    torch.testing.assert_close(folded, raw / torch.dot(u, raw @ v), atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_norm(folded, ord=2).item() == pytest.approx(1.0, abs=1e-3)
    assert not torch.allclose(raw, folded)
    model, info = AutoModelForSequenceClassification.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# --- 4. Diverged runs ---------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--method", "std", "--learning-rate", "1e6"],
                                   ["--method", "r3f", "--noise-eps", "1e30"]])
def test_a_diverging_run_stops_with_an_error_and_keeps_nothing_as_best(tiny_checkpoint, tmp_path, capsys, extra):
    out = tmp_path / "run"
    args = finetune(tiny_checkpoint, out, "--max-steps", "12", "--eval-steps", "4")
    args[args.index("--learning-rate"):args.index("--learning-rate") + 2] = []
    assert main([*args, *extra]) == 2
    one_line_error(capsys, "diverged", "non-finite", alone=False)
    assert not (out / "results.json").exists() and not (out / "best").exists()


def test_a_non_finite_update_is_skipped_counted_and_leaves_the_weights(tiny_checkpoint, tmp_path, monkeypatch):
    from rxf.methods.standard import Standard

    calls = {"n": 0}
    original = Standard.loss

    def nan_on_third_call(self, model, batch):
        loss, logs = original(self, model, batch)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] == 3 else (loss, logs)

    monkeypatch.setattr(Standard, "loss", nan_on_third_call)
    out = tmp_path / "run"
    assert main(finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "6", "--eval-steps", "3")) == 0
    results = strict_json(out / "results.json")
    assert results["skipped_updates"] == 1 and results["updates"] == 6
    weights = load_file(out / "best" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_skip_leaves_weights_and_optimizer_moments_untouched(tiny_checkpoint, tmp_path):
    """The guard drops a non-finite update's gradients: AdamW then moves nothing."""
    from rxf.optim import adamw

    model = torch.nn.Linear(3, 2)
    optimizer = adamw(model.parameters(), bias_correction=True, lr=0.1, weight_decay=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items() if torch.is_tensor(v)}
    (model(torch.ones(1, 3)).sum() * float("nan")).backward()
    model.zero_grad(set_to_none=True)  # what RXFTrainer._guard_update does
    optimizer.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in moments.items():
        assert torch.equal(optimizer.state[model.weight][k], v)


def test_a_non_finite_score_or_model_is_never_the_best(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rxf.trainer import RXFConfig

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint, num_labels=2)
    config = RXFConfig(output_dir=str(tmp_path), method="std", metric_for_best_model="dev_accuracy",
                       save_strategy="steps", report_to="none")
    trainer = RXFTrainer(model=model, args=config)
    assert not trainer._determine_best_metric({"eval_dev_accuracy": float("nan")}, None)
    assert trainer._determine_best_metric({"eval_dev_accuracy": 0.5}, None)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    assert not trainer._determine_best_metric({"eval_dev_accuracy": 0.9}, None)
    assert trainer.state.best_metric == 0.5


def test_results_are_strict_json():
    from rxf.jsonio import write_json_atomic

    import tempfile

    path = Path(tempfile.mkdtemp()) / "r.json"
    write_json_atomic(path, {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert strict_json(path) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


# --- 5. Warm-up ratio ------------------------------------------------------------------------

@pytest.mark.parametrize("ratio, steps", [(1.0, 100), (0.06, 6), (0.0, 0), (0.5, 50)])
def test_warmup_ratio_is_a_fraction_of_all_updates(tmp_path, ratio, steps):
    from rxf.trainer import RXFConfig

    config = RXFConfig(output_dir=str(tmp_path), warmup_ratio=ratio, report_to="none")
    assert config.get_warmup_steps(100) == steps
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = RXFTrainer.__new__(RXFTrainer)
    trainer.args, trainer.lr_scheduler = config, None
    scheduler = trainer.create_scheduler(100, optimizer)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    # Rising over the warm-up, falling after it.
    assert np.all(np.diff(rates[: steps + 1]) > 0) and np.all(np.diff(rates[steps:]) < 0)


# --- One line, exit 2, nothing left behind ---------------------------------------------------

@pytest.mark.parametrize("extra, named", [
    (["--seed", "-1"], "--seed"),
    (["--warmup-ratio", "-0.5"], "--warmup-ratio"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--warmup-ratio", "nan"], "--warmup-ratio"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--noise-eps", "nan"], "--noise-eps"),
    (["--r3f-lambda", "nan"], "--r3f-lambda"),
    (["--smart-epsilon", "inf"], "--smart-epsilon"),
    (["--max-nonfinite-updates", "0"], "--max-nonfinite-updates"),
    (["--max-steps", "0"], "--max-steps"),  # the Trainer would run one update
    (["--max-length", "1000"], "more than the model takes (128)"),  # else a shape error mid-run
])
def test_bad_option_values_fail_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch, extra, named):
    monkeypatch.setenv("RXF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main([*finetune(tiny_checkpoint, out), *extra]) == 2
    one_line_error(capsys, named)
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "remove", "empty folder", "run folder", "no tokenizer"])
def test_a_broken_model_folder_fails_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch, damage):
    monkeypatch.setenv("RXF_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    if damage == "empty folder":
        model.mkdir()
    elif damage == "run folder":  # rxf's own output named instead of its best/
        shutil.copytree(tiny_checkpoint, model / "best")
    else:
        shutil.copytree(tiny_checkpoint, model)
    weights = model / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00not safetensors" * 100)
    elif damage == "remove":
        weights.unlink()
    elif damage == "no tokenizer":  # transformers would build an empty-vocabulary tokenizer: all [UNK]
        for file in model.iterdir():
            if file.name not in ("config.json", "model.safetensors"):
                file.unlink()
    out = tmp_path / "out"
    assert main(finetune(model, out)) == 2
    hint = {"empty folder": "no config.json in it", "run folder": f"its fine-tuned model is {model / 'best'}",
            "no tokenizer": "has no tokenizer files"}
    one_line_error(capsys, "--model", str(model), hint.get(damage, "cannot load"))
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_an_output_dir_that_is_a_file_or_unwritable_fails_in_one_line(tiny_checkpoint, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("RXF_CACHE", str(tmp_path / "cache"))
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main(finetune(tiny_checkpoint, taken)) == 2
    one_line_error(capsys, "--output-dir", "not a folder")
    assert taken.read_text() == "mine"
    # Below a file: no folder can be made there, even by root.
    assert main(finetune(tiny_checkpoint, taken / "run")) == 2
    one_line_error(capsys, "--output-dir")
    assert not (tmp_path / "cache").exists()


def test_leftovers_of_a_kill_during_the_final_save_are_removed(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "run"
    restore = interrupt_after_checkpoint(monkeypatch, 2)
    args = finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "4", "--eval-steps", "2")
    with pytest.raises(Killed):
        main(args)
    restore()
    (out / ".best.tmp123").mkdir()
    (out / ".best.tmp123" / "model.safetensors").write_bytes(b"half")
    (out / "best" / ".tmp9").mkdir(parents=True)
    assert main(args) == 0
    assert not list(out.glob(".best.tmp*")) and not (out / "best" / ".tmp9").exists()
    assert (out / "best" / "model.safetensors").is_file()


# --- Checkpoints: what a run folder holds -----------------------------------------------------

def test_only_the_newest_checkpoint_keeps_the_optimizer_and_a_finished_run_drops_them(tiny_checkpoint, tmp_path):
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    args = ["--method", "std", "--max-steps", "8", "--eval-steps", "2"]
    assert main(finetune(tiny_checkpoint, kept, *args, "--keep-checkpoints")) == 0
    checkpoints = sorted((kept / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) >= 2
    assert [(c / "optimizer.pt").exists() for c in checkpoints] == [False] * (len(checkpoints) - 1) + [True]
    assert main(finetune(tiny_checkpoint, dropped, *args)) == 0
    assert sorted(p.name for p in dropped.iterdir()) == ["best", "results.json", "run.json"]


def test_the_last_update_is_always_evaluated(tiny_checkpoint, tmp_path):
    """"final" is the final model's score even when the length is no multiple of --eval-steps."""
    out = tmp_path / "run"
    assert main(finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "5", "--eval-steps", "2")) == 0
    results = strict_json(out / "results.json")
    assert [e["step"] for e in results["history"]] == [2, 4, 5]
    assert results["final"]["dev"]["loss"] == results["history"][-1]["eval_dev_loss"]


def test_an_option_added_later_at_its_default_does_not_make_a_run_another(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = finetune(tiny_checkpoint, out, "--method", "std", "--max-steps", "2")
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    del record["spec"]["max_nonfinite_updates"], record["options"]["r3f_concat_batch"]  # as an older rxf wrote it
    (out / "run.json").write_text(json.dumps(record))
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--max-nonfinite-updates", "3"]) == 2  # not at its default: another run
    one_line_error(capsys, "max_nonfinite_updates")
