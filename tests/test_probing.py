"""Linear probes, feature cache, drift measures, chains and cycles."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_experiments import TINY_RUN, glue_like  # noqa: F401  (fixture)

from rxf.cli import main
from rxf.probing.drift import effective_rank, linear_cka
from rxf.probing.features import cached_features, load_encoder
from rxf.probing.probe import probe_checkpoint, train_linear_probe
from rxf.tasks import get_task
from rxf.tasks.loading import Examples

ROOT = Path(__file__).resolve().parents[1]

# --- drift measures --------------------------------------------------------------------


def reference_cka(x, y):
    """CKA through HSIC with linear kernels (Kornblith et al. 2019, eq. 3)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)), rng.normal(size=(50, 6))
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0)  # orthogonal rotation
    assert linear_cka(x, 3.5 * x + 7.0) == pytest.approx(1.0)  # isotropic scaling and a shift
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y))
    assert linear_cka(x @ q, 2 * y - 1) == pytest.approx(linear_cka(x, y))
    assert 0 <= linear_cka(x, y) < 0.5


def test_effective_rank_is_at_most_the_rank():
    rng = np.random.default_rng(1)
    for k in (1, 3, 5):
        m = rng.normal(size=(40, k)) @ rng.normal(size=(k, 16))
        assert effective_rank(m) <= k + 1e-9
    assert effective_rank(rng.normal(size=(200, 4))) > 3.5


# --- probes and the feature cache ------------------------------------------------------

def small_examples(n=40):
    words = ["good", "bad", "great", "awful", "fine", "poor"]
    texts = [f"it was {words[i % 6]} and {words[(i * 7) % 6]}" for i in range(n)]
    return Examples(texts, None, [int(words[i % 6] in ("good", "great", "fine")) for i in range(n)], "memory")


@pytest.mark.parametrize("pooling, layers", [("cls", None), ("mean", None), ("mean", [0, 1, 2])])
def test_encode_in_length_order_gives_each_example_its_own_unpadded_representation(tiny_checkpoint, pooling, layers):
    """Batches are formed in order of length and the rows put back in file order: each row
    equals the encoder run on that example alone (no padding at all), pooled by hand."""
    from rxf.probing.features import encode

    tokenizer, encoder = load_encoder(str(tiny_checkpoint))
    words = "a good film , the worst plot i have seen in years and then some more".split()
    first = [" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(11)]
    second = [" ".join(words[: 1 + (3 * i) % len(words)]) for i in range(11)]
    lengths = [len(tokenizer(a, b)["input_ids"]) for a, b in zip(first, second)]
    assert lengths != sorted(lengths) and max(lengths) <= 128  # file order is not length order; no truncation
    examples = Examples(first, second, [0] * 11, "pairs")
    got = encode(encoder, tokenizer, examples, max_length=128, pooling=pooling, layers=layers, batch_size=4)
    for i in range(11):
        ids = tokenizer(first[i], second[i], return_tensors="pt")
        with torch.no_grad():
            out = encoder(**ids, output_hidden_states=True)
        states = [out.hidden_states[k] for k in layers] if layers else [out.last_hidden_state]
        alone = np.stack([(h[0, 0] if pooling == "cls" else h[0].mean(0)).numpy() for h in states])
        row = got[:, i] if layers else got[i][None]
        np.testing.assert_allclose(row, alone, atol=2e-5, rtol=0)


def test_probe_trains_only_a_linear_layer(tiny_checkpoint):
    tokenizer, encoder = load_encoder(str(tiny_checkpoint))
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    splits = {"train": small_examples(), "dev": small_examples(20)}
    result = probe_checkpoint(str(tiny_checkpoint), get_task("sst2"), splits, encoder_and_tokenizer=(tokenizer, encoder))
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())
    assert 0 <= result["score"] <= 1 and result["majority"] is not None
    features, _ = cached_features(str(tiny_checkpoint), splits["train"], encoder_and_tokenizer=(tokenizer, encoder))
    probe = train_linear_probe(features, splits["train"].labels, get_task("sst2"))
    linear = probe.best_estimator_[-1]
    assert linear.coef_.shape == (1, features.shape[1])  # one linear layer on H features


def test_the_probe_regularisation_is_chosen_by_cross_validation():
    """Few examples, many noisy dimensions, one informative one: the cross-validated probe
    picks a stronger penalty than C = 1 (the old default) and generalises better."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    direction = rng.normal(size=300) / np.sqrt(300)  # the signal spread over every dimension

    def sample(n):
        labels = rng.integers(0, 2, n)
        return rng.normal(size=(n, 300)) + np.outer(2 * labels - 1, direction) * 1.5, labels

    (train_x, train_y), (dev_x, dev_y) = sample(120), sample(2000)
    task = get_task("sst2")
    probe = train_linear_probe(train_x, train_y, task, seed=0)
    fixed = LogisticRegression(C=1.0, max_iter=3000).fit((train_x - train_x.mean(0)) / train_x.std(0), train_y)
    cv_score = (probe.predict(dev_x) == dev_y).mean()
    fixed_score = (fixed.predict((dev_x - train_x.mean(0)) / train_x.std(0)) == dev_y).mean()
    assert probe.best_params_["logisticregression__C"] < 1.0
    assert cv_score > fixed_score


def test_feature_cache_is_reused_and_invalidated_by_new_weights(tiny_checkpoint, tmp_path):
    examples = small_examples(44)  # texts no other test encodes
    first, cached = cached_features(str(tiny_checkpoint), examples)
    assert not cached
    again, cached = cached_features(str(tiny_checkpoint), examples)
    assert cached and np.array_equal(first, again)

    changed = tmp_path / "changed"
    shutil.copytree(tiny_checkpoint, changed)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(changed)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.5)
    model.save_pretrained(changed)
    other, cached = cached_features(str(changed), examples)
    assert not cached and not np.array_equal(first, other)


# --- commands ----------------------------------------------------------------------------

def test_chain_and_cycle_run_and_resume(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    out = tmp_path / "chain"
    args = ["chain", "--tasks", "sst2,rte", "--methods", "std,r3f", "--model", str(tiny_checkpoint),
            "--data-dir", str(glue_like), "--output-dir", str(out), *TINY_RUN]
    assert main(args) == 0
    report = json.loads((out / "chain.json").read_text())
    for method in ("std", "r3f"):
        stages = report["methods"][method]
        assert [s["stage"] for s in stages] == ["pre-trained", "after sst2", "after rte"]
        assert all(0 <= s["score"] <= 1 and s["task"] == "sst2" for s in stages)
    assert plt.imread(out / "chain.png").ndim == 3 and "| std |" in (out / "chain.md").read_text()
    # The second stage starts from the first stage's best checkpoint.
    second = json.loads((out / "r3f" / "stage02-rte" / "results.json").read_text())
    assert second["model"] == str(out / "r3f" / "stage01-sst2" / "best")

    # Interrupted between stages: the last stage is gone; the rerun redoes only it.
    first_stage = out / "std" / "stage01-sst2" / "results.json"
    mtime = first_stage.stat().st_mtime_ns
    shutil.rmtree(out / "std" / "stage02-rte")
    assert main(args) == 0
    assert first_stage.stat().st_mtime_ns == mtime
    assert (out / "std" / "stage02-rte" / "results.json").is_file()

    # A stored probe is reused only while it is the probe asked for: a stage whose weights
    # changed in place (retrained with --overwrite) and another pooling are probed again.
    last_probe, first_probe = out / "std" / "stage02-rte.probe-sst2.json", out / "std" / "stage01-sst2.probe-sst2.json"
    before, first_mtime = json.loads(last_probe.read_text()), first_probe.stat().st_mtime_ns
    weights_file = out / "std" / "stage02-rte" / "best" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, weights_file, metadata={"format": "pt"})
    assert main(args) == 0
    after = json.loads(last_probe.read_text())
    assert after["identity"]["weights"] != before["identity"]["weights"] and not after["features_cached"]
    assert first_probe.stat().st_mtime_ns == first_mtime  # unchanged stages keep their probes
    assert main([*args, "--pooling", "mean"]) == 0
    stages = json.loads((out / "chain.json").read_text())["methods"]["std"]
    assert [s["identity"]["pooling"] for s in stages] == ["mean"] * 3 and not any(s["features_cached"] for s in stages)
    assert json.loads(first_probe.read_text())["identity"]["pooling"] == "mean"
    assert "(mean pooling" in (out / "chain.md").read_text()
    # A damaged stored probe (cut short, or not an object) is only a copy: it is made again.
    good = first_probe.read_text()
    for damaged in (good[:len(good) // 2], "[1, 2, 3]"):
        first_probe.write_text(damaged)
        assert main([*args, "--pooling", "mean"]) == 0
        assert json.loads(first_probe.read_text())["score"] == json.loads(good)["score"]

    cyc = tmp_path / "cycle"
    args = ["cycle", "--tasks", "sst2,rte", "--cycles", "2", "--methods", "std,r3f", "--model", str(tiny_checkpoint),
            "--data-dir", str(glue_like), "--output-dir", str(cyc), *TINY_RUN]
    assert main(args) == 0
    report = json.loads((cyc / "cycle.json").read_text())
    probes = report["methods"]["r3f"]
    assert [(p["cycle"], p["task"]) for p in probes] == [(1, "sst2"), (1, "rte"), (2, "sst2"), (2, "rte")]
    assert (cyc / "cycle.png").is_file() and "| r3f | 2 |" in (cyc / "cycle.md").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in cyc.rglob("results.json")}
    shutil.rmtree(cyc / "std" / "stage04-c2-rte")
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.exists() and "stage04" not in str(p))


def test_a_chain_stage_trains_for_its_own_task_epochs(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    """--task-epochs rte=3 gives RTE's stage three epochs and leaves SST-2's at --epochs:
    counted in updates against the training set's size, not read from the spec rxf wrote."""
    out = tmp_path / "chain"
    assert main(["chain", "--tasks", "sst2,rte", "--methods", "std", "--task-epochs", "rte=3",
                 "--model", str(tiny_checkpoint), "--data-dir", str(glue_like), "--output-dir", str(out),
                 *TINY_RUN]) == 0
    batch = int(TINY_RUN[TINY_RUN.index("--batch-size") + 1])
    for stage, folder, epochs in (("stage01-sst2", "SST-2", 1), ("stage02-rte", "RTE", 3)):
        examples = len((glue_like / folder / "train.tsv").read_text().splitlines()) - 1
        results = json.loads((out / "std" / stage / "results.json").read_text())
        assert results["data"]["train"]["examples"] == examples
        assert results["updates"] == epochs * -(-examples // batch), (stage, results["updates"])


def test_probe_table_marks_missing_scores_and_prints_the_rest_x100():
    """A score JSON stored as null (NaN) or a task without a majority baseline shows "–",
    never "nan" or a crash; other cells are ×100 to one decimal."""
    from rxf.probing.report import probe_table

    report = {"tasks": ["sst2", "stsb"], "probes": {"base": {
        "sst2": {"main_metric": "accuracy", "score": 0.8125, "train_score": 0.9, "majority": 0.5094},
        "stsb": {"main_metric": "pearson", "score": None, "train_score": float("nan"), "majority": None}}}}
    table = probe_table(report)
    assert "| base | 81.2 (90.0) | – (–) |" in table
    assert "| majority class | 50.9 | – |" in table
    assert "nan" not in table


@pytest.mark.real
def test_probe_base_minilm_on_real_glue(data_dir, minilm_path, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--tasks", "sst2,mrpc", "--data-dir", str(data_dir / "glue"), "--max-train-samples",
                 "1000", "--reference", "base", "--cka-samples", "128", "--output-dir", str(out)]) == 0
    report = json.loads((out / "probe.json").read_text())
    sst2 = report["probes"]["pre-trained"]["sst2"]
    assert sst2["train_examples"] == 1000 and sst2["dev_examples"] == 872
    assert sst2["score"] > sst2["majority"] + 0.1
    # With the regularisation chosen by cross-validation the pre-trained encoder's probe
    # beats the majority class on MRPC too (with a fixed C = 1 it fell below it).
    mrpc = report["probes"]["pre-trained"]["mrpc"]
    assert mrpc["score"] > mrpc["majority"] and mrpc["train_score"] >= mrpc["score"] - 0.05
    assert set(mrpc["regularisation"]) == {"C"}
    assert all(layer["cka"] == pytest.approx(1.0) for layer in report["drift"]["checkpoints"]["pre-trained"])
    assert plt.imread(out / "probe.png").ndim == 3 and plt.imread(out / "cka.png").ndim == 3
    assert "| pre-trained |" in (out / "probe.md").read_text()


def test_probe_every_run_of_a_compare_with_mean_and_std_per_method(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    runs = tmp_path / "compare"
    assert main(["compare", "--tasks", "sst2", "--methods", "std,r3f", "--seeds", "1,2", "--model", str(tiny_checkpoint),
                 "--data-dir", str(glue_like), "--output-dir", str(runs), "--max-steps", "2", *TINY_RUN]) == 0
    out = tmp_path / "probe"
    assert main(["probe", "--runs", str(runs), "--include-base", "--tasks", "sst2,rte", "--model", str(tiny_checkpoint),
                 "--data-dir", str(glue_like), "--output-dir", str(out), "--max-length", "48"]) == 0
    report = json.loads((out / "probe.json").read_text())
    assert set(report["probes"]) == {"pre-trained", "std/seed1", "std/seed2", "r3f/seed1", "r3f/seed2"}
    for method in ("std", "r3f"):
        scores = [report["probes"][f"{method}/seed{s}"]["rte"]["score"] for s in (1, 2)]
        group = report["groups"][method]["rte"]
        assert group["n"] == 2 and group["mean"] == pytest.approx(np.mean(scores))
        assert group["std"] == pytest.approx(np.std(scores, ddof=1))
    assert "| std | " in (out / "probe.md").read_text() and plt.imread(out / "probe.png").ndim == 3

    # The same encoders probed seed by seed (another session each), then merged, give the
    # same report as the one probe of all of them.
    common = ["--include-base", "--tasks", "sst2,rte", "--model", str(tiny_checkpoint), "--data-dir", str(glue_like),
              "--reference", "base", "--cka-samples", "16"]
    best = {f"{m}/seed{s}": runs / "runs" / "sst2" / m / f"seed{s}" / "best" for m in ("std", "r3f") for s in (1, 2)}
    for seed in (1, 2):
        picked = [f"--checkpoint={name}={path}" for name, path in best.items() if name.endswith(str(seed))]
        assert main(["probe", *picked, *common, "--output-dir", str(tmp_path / f"seed{seed}"), "--max-length", "48"]) == 0
    assert main(["probe", "--runs", str(runs), *common, "--output-dir", str(tmp_path / "all"), "--max-length", "48"]) == 0
    merge = [sys.executable, str(ROOT / "scripts" / "merge_probes.py"), str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    done = subprocess.run([*merge, "--output-dir", str(tmp_path / "merged")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged, whole = (json.loads((tmp_path / d / "probe.json").read_text()) for d in ("merged", "all"))
    assert set(merged["probes"]) == set(whole["probes"]) == {"pre-trained", *best}
    for method in ("std", "r3f"):
        for task in ("sst2", "rte"):
            assert merged["groups"][method][task]["n"] == 2
            assert merged["groups"][method][task]["mean"] == pytest.approx(whole["groups"][method][task]["mean"])
            assert merged["groups"][method][task]["std"] == pytest.approx(whole["groups"][method][task]["std"])
    assert set(merged["drift"]["checkpoints"]) == set(whole["drift"]["checkpoints"])
    assert plt.imread(tmp_path / "merged" / "probe.png").ndim == 3 and (tmp_path / "merged" / "cka.png").is_file()

    # Reports probed differently, or with no encoder in common, are refused by name.
    assert main(["probe", *[f"--checkpoint=std/seed2={best['std/seed2']}"], *common,
                 "--output-dir", str(tmp_path / "short"), "--max-length", "24"]) == 0
    refused = subprocess.run([*merge[:3], str(tmp_path / "short"), "--output-dir", str(tmp_path / "bad")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "max_length" in refused.stderr and "short" in refused.stderr
    assert not (tmp_path / "bad").exists()
    lone = tmp_path / "lone"
    assert main(["probe", f"--checkpoint=std/seed2={best['std/seed2']}", "--tasks", "sst2,rte", "--model",
                 str(tiny_checkpoint), "--data-dir", str(glue_like), "--output-dir", str(lone), "--max-length", "48"]) == 0
    refused = subprocess.run([*merge[:3], str(lone), "--output-dir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert refused.returncode != 0 and "share no probed encoder" in refused.stderr
    # Writing over one of its own inputs, or one encoder under two names (two "seeds"), is refused.
    refused = subprocess.run([*merge, "--output-dir", str(tmp_path / "seed2")], capture_output=True, text=True)
    assert refused.returncode != 0 and "is one of the reports to merge" in refused.stderr
    renamed = json.loads((tmp_path / "seed2" / "probe.json").read_text())
    renamed["probes"]["std/seed3"] = renamed["probes"].pop("std/seed2")
    renamed["checkpoints"]["std/seed3"] = str(best["std/seed1"])
    renamed["drift"]["checkpoints"]["std/seed3"] = renamed["drift"]["checkpoints"].pop("std/seed2")
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "probe.json").write_text(json.dumps(renamed))
    refused = subprocess.run([*merge[:3], str(tmp_path / "renamed"), "--output-dir", str(tmp_path / "bad")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "one encoder would count as two seeds" in refused.stderr
    assert not (tmp_path / "bad").exists()


def test_chains_of_several_seeds_pool_into_mean_and_std(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    common = ["chain", "--tasks", "sst2,rte", "--methods", "std", "--model", str(tiny_checkpoint),
              "--data-dir", str(glue_like), *TINY_RUN]
    for seed in (1, 2):
        assert main([*common, "--seed", str(seed), "--output-dir", str(tmp_path / f"seed{seed}")]) == 0
    merge = [sys.executable, str(ROOT / "scripts" / "merge_chains.py"), str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    done = subprocess.run([*merge, "--output-dir", str(tmp_path / "pooled")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pooled = json.loads((tmp_path / "pooled" / "chain.json").read_text())
    assert pooled["seeds"] == [1, 2]
    chains = [json.loads((tmp_path / f"seed{s}" / "chain.json").read_text())["methods"]["std"] for s in (1, 2)]
    for index, row in enumerate(pooled["methods"]["std"]):
        probes = [chain[index]["score"] for chain in chains]
        assert row["probe"]["mean"] == pytest.approx((probes[0] + probes[1]) / 2)
        assert row["probe"]["std"] == pytest.approx(abs(probes[0] - probes[1]) / 2 ** 0.5)
    stage = [json.loads((tmp_path / f"seed{s}" / "std" / "stage02-rte" / "results.json").read_text())
             for s in (1, 2)]
    best = [r["best"]["dev"][r["main_metric"].split("/")[1]] for r in stage]
    assert pooled["methods"]["std"][2]["task_score"]["values"] == best
    assert "task_score" not in pooled["methods"]["std"][0]  # the pre-trained encoder trained on nothing
    text = (tmp_path / "pooled" / "chain.md").read_text()
    assert "| std |" in text and " ± " in text and "own task" in text
    assert plt.imread(tmp_path / "pooled" / "chain.png").ndim == 3

    # One seed alone is a report too; pooling it with a copy of itself, with a chain fine-tuned
    # otherwise, or over a folder holding other files, is refused.
    alone = subprocess.run([*merge[:3], "--output-dir", str(tmp_path / "alone")], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    shutil.copytree(tmp_path / "seed1", tmp_path / "copy", ignore=shutil.ignore_patterns("checkpoints", "best"))
    refused = subprocess.run([*merge[:3], str(tmp_path / "copy"), "--output-dir", str(tmp_path / "bad")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "are both seed 1" in refused.stderr
    shutil.copytree(tmp_path / "seed2", tmp_path / "other", ignore=shutil.ignore_patterns("checkpoints", "best"))
    stage = tmp_path / "other" / "std" / "stage01-sst2" / "results.json"
    results = json.loads(stage.read_text())
    results["spec"]["learning_rate"] = 5e-4  # as if seed 2 had been fine-tuned at another learning rate
    stage.write_text(json.dumps(results))
    refused = subprocess.run([*merge[:3], str(tmp_path / "other"), "--output-dir", str(tmp_path / "bad")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "fine-tuning settings" in refused.stderr and "other" in refused.stderr
    assert not (tmp_path / "bad").exists()
    (tmp_path / "pooled" / "notes.txt").write_text("mine")
    refused = subprocess.run([*merge, "--output-dir", str(tmp_path / "pooled")], capture_output=True, text=True)
    assert refused.returncode != 0 and "holds more than a chain report" in refused.stderr
    assert (tmp_path / "pooled" / "notes.txt").read_text() == "mine" and (tmp_path / "pooled" / "chain.json").is_file()

    # Methods run as separate processes into one seed's folder (each rewriting chain.json with
    # its own method) are all found; seeds with other methods pool only on --methods they share.
    assert main([*common, "--methods", "r3f", "--seed", "1", "--output-dir", str(tmp_path / "seed1")]) == 0
    assert list(json.loads((tmp_path / "seed1" / "chain.json").read_text())["methods"]) == ["r3f"]
    both = subprocess.run([*merge[:3], "--output-dir", str(tmp_path / "both")], capture_output=True, text=True)
    assert both.returncode == 0, both.stderr
    report = json.loads((tmp_path / "both" / "chain.json").read_text())
    assert list(report["methods"]) == ["std", "r3f"]
    r3f = json.loads((tmp_path / "seed1" / "chain.json").read_text())["methods"]["r3f"]
    assert [row["probe"]["mean"] for row in report["methods"]["r3f"]] == [stage["score"] for stage in r3f]
    refused = subprocess.run([*merge, "--output-dir", str(tmp_path / "bad")], capture_output=True, text=True)
    assert refused.returncode != 0 and "differ in methods" in refused.stderr
    shared = subprocess.run([*merge, "--methods", "std", "--output-dir", str(tmp_path / "shared")],
                            capture_output=True, text=True)
    assert shared.returncode == 0, shared.stderr
    assert json.loads((tmp_path / "shared" / "chain.json").read_text())["methods"]["std"] == pooled["methods"]["std"]
    refused = subprocess.run([*merge, "--methods", "r3f", "--output-dir", str(tmp_path / "bad")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "seed2: has no chain of r3f (it has std)" in refused.stderr
    assert not (tmp_path / "bad").exists()


def _refusal(merge: list, folders: list, out: Path) -> str:
    """merge_chains on ``folders``: it must fail, leave no report, and say why on stderr."""
    done = subprocess.run([*merge, *map(str, folders), "--output-dir", str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and not out.exists() and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_merge_chains_refuses_chains_whose_files_do_not_fit_together(tiny_checkpoint, glue_like, tmp_path):  # noqa: F811
    """What would otherwise pool without an error into a wrong report: a probe copied from
    another stage, a method folder missing its first probe, a stage without a score, stages
    scored on other metrics, chains from other pre-trained weights, a report inside a chain."""
    common = ["chain", "--tasks", "sst2,rte", "--methods", "std", "--model", str(tiny_checkpoint),
              "--data-dir", str(glue_like), *TINY_RUN]
    for seed in (1, 2):
        assert main([*common, "--seed", str(seed), "--output-dir", str(tmp_path / f"seed{seed}")]) == 0
    merge = [sys.executable, str(ROOT / "scripts" / "merge_chains.py")]
    seeds = [tmp_path / "seed1", tmp_path / "seed2"]

    def mutated(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(tmp_path / "seed2", copy, ignore=shutil.ignore_patterns("checkpoints", "best"))
        return copy

    copy = mutated("copied-probe")
    shutil.copy(copy / "std" / "stage01-sst2.probe-sst2.json", copy / "std" / "stage02-rte.probe-sst2.json")
    assert "two of its probes are of the same weights" in _refusal(merge, [copy], tmp_path / "bad")
    shutil.copy(copy / "std" / "stage00-pretrained.probe-sst2.json", copy / "std" / "stage01-sst2.probe-sst2.json")
    assert "not of this chain's encoder" in _refusal(merge, [copy], tmp_path / "bad")

    copy = mutated("no-first-probe")
    shutil.copytree(tmp_path / "seed2" / "std", copy / "r3f", ignore=shutil.ignore_patterns("checkpoints", "best"))
    (copy / "r3f" / "stage00-pretrained.probe-sst2.json").unlink()
    assert "expected one probe of the pre-trained encoder" in _refusal(merge, [copy], tmp_path / "bad")

    copy = mutated("no-score")
    results_path = copy / "std" / "stage01-sst2" / "results.json"
    results = json.loads(results_path.read_text())
    results_path.write_text(json.dumps({**results, "best": {}}))
    assert "no best score" in _refusal(merge, [seeds[0], copy], tmp_path / "bad")
    results_path.write_text(json.dumps({**results, "main_metric": "dev/loss"}))
    assert "fine-tuning settings" in _refusal(merge, [seeds[0], copy], tmp_path / "bad")

    copy = mutated("other-model")
    probe_path, run_path = copy / "std" / "stage00-pretrained.probe-sst2.json", copy / "std" / "stage01-sst2" / "run.json"
    probe, run = json.loads(probe_path.read_text()), json.loads(run_path.read_text())
    probe["identity"]["weights"] = run["model_files"] = "0123456789abcdef"
    probe_path.write_text(json.dumps(probe))
    run_path.write_text(json.dumps(run))
    assert "pre-trained weights" in _refusal(merge, [seeds[0], copy], tmp_path / "bad")

    inside = seeds[1] / "std" / "report"
    assert "inside one" in _refusal(merge, seeds, inside)


def test_probe_names_a_missing_checkpoint_folder_before_probing(tiny_checkpoint, glue_like, tmp_path, capsys):  # noqa: F811
    args = ["probe", f"--checkpoint=std/seed1={tmp_path / 'runs' / 'std' / 'seed1' / 'best'}", "--tasks", "sst2",
            "--model", str(tiny_checkpoint), "--data-dir", str(glue_like), "--output-dir", str(tmp_path / "out")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "seed1/best is not a folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
