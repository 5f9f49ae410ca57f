"""Your own data end to end through ``rxf.cli.main``: ``finetune`` on files without a GLUE
task (headerless TSV, CSV, JSONL, gzip, regression), ``evaluate`` (metrics, GLUE
diagnostic categories) and ``predict`` (JSONL, GLUE submission layout), and ``rxf xnli``
on files it does not recognise. Expected metrics are computed here, independently, from
the checkpoint's own predictions (one example at a time, no batching)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rxf.cli import main
from rxf.demo import DEMO_DATA
from rxf.errors import DataError
from rxf.experiments.xnli import parse_eval_columns, read_language_file

# Character-level words per class, so that the tiny model learns something in a few updates.
WORDS = {"pos": ["abc", "bad", "cab", "dab"], "neg": ["xyz", "zyx", "wxy", "yxw"], "neu": ["123", "321", "456"]}
NLI_WORDS = {"entailment": ["abc", "bad", "cab"], "neutral": ["123", "321", "456"],
             "contradiction": ["xyz", "zyx", "wxy"]}
RUN = ["--max-length", "32", "--batch-size", "8", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--no-progress"]


# --- helpers -------------------------------------------------------------------------


def sentences(n: int, seed: int, words=WORDS) -> list[tuple[str, str]]:
    """(text, label) rows, labels in turn."""
    rng = random.Random(seed)
    labels = list(words)
    return [(" ".join(rng.choice(words[labels[i % len(labels)]]) for _ in range(3)), labels[i % len(labels)])
            for i in range(n)]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def tsv(rows, header=None) -> str:
    return "".join("\t".join(map(str, r)) + "\n" for r in ([header] if header else []) + list(rows))


def csv_text(rows, header) -> str:
    return "".join(",".join(map(str, r)) + "\n" for r in [header] + list(rows))


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def own_logits(checkpoint: Path, first: list[str], second: list[str] | None = None) -> np.ndarray:
    """(N, C) logits of the checkpoint, one example at a time (no padding, no batching)."""
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rows = []
    with torch.no_grad():
        for i, text in enumerate(first):
            pair = (text, second[i]) if second else (text,)
            rows.append(model(**tokenizer(*pair, truncation=True, max_length=32, return_tensors="pt")).logits[0].numpy())
    return np.stack(rows)


def accuracy(gold, pred) -> float:
    return float(np.mean(np.asarray(gold) == np.asarray(pred)))


def macro_f1(gold, pred) -> float:
    """F1 per class over the classes in either array, averaged."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    scores = []
    for c in np.union1d(gold, pred):
        tp, fp, fn = np.sum((pred == c) & (gold == c)), np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def r3(gold, pred) -> float:
    """Gorodkin's R_K (multi-class Matthews correlation) from the counts."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    classes = np.union1d(gold, pred)
    s, c = len(gold), np.sum(gold == pred)
    p = np.array([np.sum(pred == k) for k in classes])
    t = np.array([np.sum(gold == k) for k in classes])
    denominator = np.sqrt((s ** 2 - p @ p) * (s ** 2 - t @ t))
    return 0.0 if denominator == 0 else float((c * s - p @ t) / denominator)


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


# --- shared runs ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded (and a busy 2-core machine makes two
    threads of them crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    # The module's runs tokenise outside any test's function-scoped cache fixture.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RXF_CACHE", str(tmp_path_factory.getbasetemp() / "rxf-cache"))
        yield


@pytest.fixture(scope="module")
def cls_run(tiny_checkpoint, tmp_path_factory, module_cache):
    """Classification on headerless TSV files, columns by position; labels pos/neg/neu."""
    root = tmp_path_factory.mktemp("cls")
    train = write(root / "train.tsv", tsv(sentences(60, 0)))
    dev = write(root / "dev.tsv", tsv(sentences(21, 1)))
    out = root / "run"
    assert main(["finetune", "--train-file", str(train), "--dev-file", str(dev), "--text-columns", "0",
                 "--label-column", "1", "--model", str(tiny_checkpoint), "--output-dir", str(out),
                 "--max-steps", "16", "--eval-steps", "8", "--method", "std", *RUN]) == 0
    return {"root": root, "dev": dev, "out": out}


@pytest.fixture(scope="module")
def reg_run(tiny_checkpoint, tmp_path_factory, module_cache):
    """Regression on CSV files with a header: text, score."""
    root = tmp_path_factory.mktemp("reg")
    value = {"pos": 4.5, "neg": 0.5, "neu": 2.5}
    rows = lambda n, seed: [(t, value[l] + 0.1 * (i % 3)) for i, (t, l) in enumerate(sentences(n, seed))]
    write(root / "train.csv", csv_text(rows(48, 0), ["text", "score"]))
    write(root / "dev.csv", csv_text(rows(18, 1), ["text", "score"]))
    out = root / "run"
    assert main(["finetune", "--task", "regression", "--data-dir", str(root), "--model", str(tiny_checkpoint),
                 "--output-dir", str(out), "--max-steps", "24", "--eval-steps", "12", "--method", "r3f", *RUN,
                 "--learning-rate", "1e-2"]) == 0
    return {"root": root, "out": out, "dev": root / "dev.csv"}


@pytest.fixture(scope="module")
def mnli_run(tiny_checkpoint, tmp_path_factory, module_cache):
    """A GLUE MNLI run on small local files in the official layout."""
    root = tmp_path_factory.mktemp("mnli")
    rows = lambda n, seed: [(t, "the " + t.split()[0], l) for t, l in sentences(n, seed, NLI_WORDS)]
    write(root / "data" / "train.tsv", tsv(rows(48, 0), ["sentence1", "sentence2", "gold_label"]))
    write(root / "data" / "dev_matched.tsv", tsv(rows(12, 1), ["sentence1", "sentence2", "gold_label"]))
    out = root / "run"
    assert main(["finetune", "--task", "mnli", "--data-dir", str(root / "data"), "--model", str(tiny_checkpoint),
                 "--output-dir", str(out), "--max-steps", "12", "--eval-steps", "6", "--method", "std", *RUN]) == 0
    return {"root": root, "out": out, "rows": rows}


# --- 1. finetune on your own files ---------------------------------------------------


def test_headerless_tsv_by_position_discovers_the_label_set(cls_run):
    out = cls_run["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "classification" and results["main_metric"] == "dev/accuracy"
    spec = results["spec"]
    assert (spec["labels"], spec["text_columns"], spec["label_column"], spec["header"]) == ("neg,neu,pos", "0", "1", False)
    assert json.loads((out / "run.json").read_text())["spec"]["labels"] == "neg,neu,pos"  # part of the identity
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    # The best checkpoint's dev metrics are those of its own predictions.
    rows = sentences(21, 1)
    gold = [["neg", "neu", "pos"].index(label) for _, label in rows]
    predicted = own_logits(out / "best", [text for text, _ in rows]).argmax(-1)
    best = results["best"]["dev"]
    assert best["accuracy"] == pytest.approx(accuracy(gold, predicted))
    assert best["macro_f1"] == pytest.approx(macro_f1(gold, predicted))
    assert len(set(predicted)) > 1  # it learnt something: the metrics are not those of a constant


def test_gzipped_csv_pairs_sort_integer_labels_numerically(tiny_checkpoint, tmp_path):
    rows = [(t, t[::-1], {"pos": 10, "neg": 2, "neu": 1}[l]) for t, l in sentences(30, 0)]
    train = write(tmp_path / "train.csv.gz", csv_text(rows, ["sentence1", "sentence2", "label"]))
    dev = write(tmp_path / "dev.csv", csv_text(rows[:9], ["sentence1", "sentence2", "label"]))
    out = tmp_path / "run"
    assert main(["finetune", "--train-file", str(train), "--dev-file", str(dev), "--model", str(tiny_checkpoint),
                 "--output-dir", str(out), "--max-steps", "2", "--main-metric", "macro_f1", *RUN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "dev/macro_f1"
    assert results["spec"]["text_columns"] == "sentence1,sentence2" and results["spec"]["labels"] == "1,2,10"
    assert json.loads((out / "best" / "config.json").read_text())["id2label"] == {"0": "1", "1": "2", "2": "10"}
    assert results["data"]["train"]["examples"] == 30


def test_jsonl_with_a_given_label_order_and_the_label_set_in_the_identity(tiny_checkpoint, tmp_path, capsys):
    records = [{"review": t, "stars": {"pos": "good", "neg": "bad", "neu": "ok"}[l]} for t, l in sentences(24, 0)]
    write(tmp_path / "train.jsonl", jsonl(records))
    write(tmp_path / "dev.jsonl", jsonl(records[:6]))
    args = ["finetune", "--data-dir", str(tmp_path), "--task", "classification", "--text-columns", "review",
            "--label-column", "stars", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "2", *RUN]
    assert main([*args, "--labels", "good,ok,bad"]) == 0
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["id2label"] == {"0": "good", "1": "ok", "2": "bad"}
    capsys.readouterr()
    # Another label order is another run: refused, naming the difference.
    err = one_line_error(capsys, main([*args, "--labels", "bad,good,ok"]))
    assert "holds another run" in err and "spec.labels ('good,ok,bad' there, 'bad,good,ok' now)" in err


@pytest.mark.parametrize("method", ["std++", "r3f", "r4f", "smart", "freelb"])
def test_every_method_on_a_headerless_csv(tiny_checkpoint, tmp_path, method):
    rows = [(t, l) for t, l in sentences(16, 0)]
    write(tmp_path / "train.csv", "".join(f"{t},{l}\n" for t, l in rows))
    write(tmp_path / "dev.csv", "".join(f"{t},{l}\n" for t, l in rows[:6]))
    out = tmp_path / "run"
    assert main(["finetune", "--data-dir", str(tmp_path), "--no-header", "--model", str(tiny_checkpoint),
                 "--output-dir", str(out), "--max-steps", "2", "--method", method, "--task", "classification",
                 *RUN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and results["updates"] >= 2  # std++ trains longer
    assert results["spec"]["text_columns"] == "0" and results["spec"]["label_column"] == "1"
    assert set(results["best"]["dev"]) >= {"accuracy", "macro_f1"}


def test_regression_reports_correlations_of_its_own_scores(reg_run):
    results = json.loads((reg_run["out"] / "results.json").read_text())
    assert results["task"] == "regression" and results["main_metric"] == "dev/pearson"
    assert json.loads((reg_run["out"] / "best" / "config.json").read_text())["problem_type"] == "regression"
    lines = reg_run["dev"].read_text().splitlines()[1:]
    texts, gold = [line.split(",")[0] for line in lines], [float(line.split(",")[1]) for line in lines]
    scores = own_logits(reg_run["out"] / "best", texts)[:, 0]
    assert np.std(scores) > 0.1  # it learnt: the correlations are not those of near-constant scores
    assert results["best"]["dev"]["pearson"] == pytest.approx(pearsonr(scores, gold)[0], abs=1e-5)
    assert results["best"]["dev"]["spearman"] == pytest.approx(spearmanr(scores, gold)[0], abs=1e-5)


def test_unknown_dev_label_is_refused_with_file_and_line(tiny_checkpoint, tmp_path, capsys):
    write(tmp_path / "train.csv", csv_text([("good", "yes"), ("bad", "no")], ["text", "label"]))
    write(tmp_path / "dev.csv", csv_text([("fine", "yes"), ("odd", "maybe")], ["text", "label"]))
    out = tmp_path / "out"
    err = one_line_error(capsys, main(["finetune", "--data-dir", str(tmp_path), "--task", "classification",
                                       "--model", str(tiny_checkpoint), "--output-dir", str(out)]))
    assert f"{tmp_path / 'dev.csv'}:3: label 'maybe' is not one of no, yes" in err
    assert not out.exists()


@pytest.mark.parametrize("extra, train, message", [
    (["--no-header"], ("train.jsonl", '{"text": "a", "label": "x"}\n'), "JSONL rows name their fields"),
    (["--task", "sst2", "--text-columns", "review"], None, "--text-columns: applies to --task classification"),
    (["--task", "regression", "--labels", "a,b"], None, "--labels: a regression task has scores"),
    (["--main-metric", "pearson"], None, "--main-metric: 'pearson' is not a classification metric"),
    (["--no-header", "--label-column", "label"], None, "--label-column: 'label' is not a column position"),
    (["--text-columns", "review"], None, "no column 'review' (--text-columns); the file has text, label"),
    (["--columns", "sentence=text"], None, "--columns maps a GLUE task's columns"),
    ([], ("train.csv", "text,label\na,x\nb,x\n"), "only one label ('x') in the training file"),
    # 1 and 1.0 as two classes would be a silent wrong model: refused, naming both lines.
    ([], ("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": 1.0}\n'),
     "train.jsonl:3: label '1.0' is the number of label '1' (line 1) written another way"),
    ([], ("train.csv", "text,label\na,Pos\nb,neg\nc,pos\n"),
     "train.csv:4: label 'pos' is label 'Pos' (line 2) written another way"),
    ([], ("train.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": "y"}\n'),
     "train.jsonl:1: column 'label' holds a JSON list, not a text, label or number"),
    ([], ("train.jsonl", '{"text": {"t": "a"}, "label": "x"}\n{"text": "b", "label": "y"}\n'),
     "train.jsonl:1: column 'text' holds a JSON object"),
])
def test_bad_generic_options_fail_cleanly(tmp_path, capsys, extra, train, message):
    name, content = train or ("train.csv", "text,label\na,x\nb,y\n")
    train_path = write(tmp_path / name, content)
    dev_path = write(tmp_path / "dev.csv", "text,label\nc,x\n")
    out = tmp_path / "out"
    err = one_line_error(capsys, main(["finetune", "--train-file", str(train_path), "--dev-file", str(dev_path),
                                       "--output-dir", str(out), *extra]))
    assert message in err
    assert not out.exists()


def test_finetune_without_task_or_files_is_refused(tmp_path, capsys):
    err = one_line_error(capsys, main(["finetune", "--output-dir", str(tmp_path / "out")]))
    assert "--task: give a GLUE or summarisation task, or --train-file and --dev-file" in err


def test_compare_and_chain_take_a_task_on_your_own_files(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    write(data / "train.tsv", tsv(sentences(24, 0), ["text", "label"]))
    write(data / "dev.tsv", tsv(sentences(9, 1), ["text", "label"]))
    assert main(["compare", "--tasks", "classification", "--methods", "std", "--seeds", "1", "--data-dir", str(data),
                 "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "cmp"), "--max-steps", "2", *RUN]) == 0
    assert "classification" in (tmp_path / "cmp" / "report.md").read_text()
    assert (tmp_path / "cmp" / "runs" / "classification" / "std" / "seed1" / "results.json").is_file()
    # A chain: SST-2 (the probed source task), then a stage on your own files.
    assert main(["chain", "--tasks", "sst2,classification", "--methods", "std", "--task-data", f"sst2={DEMO_DATA}",
                 "--task-data", f"classification={data}", "--max-train-samples", "24", "--max-eval-samples", "12",
                 "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "chain"), "--max-steps", "2",
                 *RUN]) == 0
    stages = json.loads((tmp_path / "chain" / "chain.json").read_text())["methods"]["std"]
    assert [s["stage"] for s in stages] == ["pre-trained", "after sst2", "after classification"]
    capsys.readouterr()
    for args, message in ((["probe", "--tasks", "classification"], "rxf probe takes GLUE tasks only"),
                          (["compare", "--tasks", "rte,classification"], "give it as the only task"),
                          (["chain", "--tasks", "classification,rte"], "a task on your own files is one stage after")):
        err = one_line_error(capsys, main([*args, "--output-dir", str(tmp_path / "x")]))
        assert message in err
    assert not (tmp_path / "x").exists()


# --- 2. evaluate ---------------------------------------------------------------------


def test_evaluate_files_with_the_metrics_of_the_models_own_predictions(cls_run, tmp_path, capsys):
    rows = sentences(15, 7)
    files = {
        "a.csv": csv_text(rows, ["text", "label"]),
        "b.jsonl": jsonl({"sentence": t, "label": l} for t, l in rows),
        "c.tsv.gz": tsv(rows),  # headerless: read by position below
    }
    paths = {name: write(tmp_path / name, content) for name, content in files.items()}
    report_path = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(paths["a.csv"]),
                 "--file", str(paths["b.jsonl"]), "--output", str(report_path)]) == 0
    assert main(["evaluate", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(paths["c.tsv.gz"]),
                 "--no-header", "--output", str(tmp_path / "eval-c.json"), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["labels"] == ["neg", "neu", "pos"] and report["task"] == "classification"
    gold = [["neg", "neu", "pos"].index(label) for _, label in rows]
    predicted = own_logits(cls_run["out"] / "best", [t for t, _ in rows]).argmax(-1)
    expected = {"accuracy": accuracy(gold, predicted), "macro_f1": macro_f1(gold, predicted)}
    other = json.loads((tmp_path / "eval-c.json").read_text())["files"][str(paths["c.tsv.gz"])]
    for result in (*report["files"].values(), other):
        assert result["examples"] == 15
        assert result["metrics"] == pytest.approx(expected)
    assert f"| {paths['a.csv']} | 15 | {100 * expected['accuracy']:.1f} | {100 * expected['macro_f1']:.1f} |" in printed


def test_evaluate_refuses_labels_the_model_does_not_know(cls_run, tiny_checkpoint, tmp_path, capsys):
    path = write(tmp_path / "dev.csv", csv_text([("abc", "pos"), ("xyz", "negative")], ["text", "label"]))
    out = tmp_path / "eval.json"
    err = one_line_error(capsys, main(["evaluate", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(path),
                                       "--output", str(out)]))
    assert f"{path}:3: label 'negative' is not one of neg, neu, pos" in err
    err = one_line_error(capsys, main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--file", str(path),
                                       "--output", str(out)]))
    assert "has no trained classification head" in err  # a pre-trained encoder, not a fine-tuned model
    err = one_line_error(capsys, main(["evaluate", "--checkpoint", str(cls_run["out"]), "--file", str(path),
                                       "--output", str(out)]))
    assert f"is a run folder; its fine-tuned model is {cls_run['out'] / 'best'}" in err
    assert not out.exists()


def test_evaluate_regression(reg_run, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(reg_run["out"] / "best"), "--file", str(reg_run["dev"]),
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())["files"][str(reg_run["dev"])]
    lines = reg_run["dev"].read_text().splitlines()[1:]
    scores = own_logits(reg_run["out"] / "best", [line.split(",")[0] for line in lines])[:, 0]
    gold = [float(line.split(",")[1]) for line in lines]
    assert result["metrics"]["pearson"] == pytest.approx(pearsonr(scores, gold)[0], abs=1e-5)
    assert result["metrics"]["spearman"] == pytest.approx(spearmanr(scores, gold)[0], abs=1e-5)


DIAGNOSTIC_HEADER = ["Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge", "Domain",
                     "Premise", "Hypothesis", "Label"]


def test_evaluate_glue_diagnostic_categories_with_r3(mnli_run, tmp_path, capsys):
    rows = mnli_run["rows"](18, 3)
    logic = ["Negation", "", "Negation;Double negation", "Conjunction", "", "Disjunction"]
    lexical = ["", "Quantifiers", "Lexical entailment;Quantifiers", "", "Morphological negation"]
    table = [[lexical[i % 5], "", logic[i % 6], "Common sense" if i % 4 == 0 else "", ["News", "ACL"][i % 2], p, h, l]
             for i, (p, h, l) in enumerate(rows)]
    path = write(tmp_path / "diagnostic-full.tsv", tsv(table, DIAGNOSTIC_HEADER))
    out = tmp_path / "ax.json"
    assert main(["evaluate", "--checkpoint", str(mnli_run["out"] / "best"), "--file", str(path),
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())["files"][str(path)]
    labels = ["entailment", "neutral", "contradiction"]
    gold = np.array([labels.index(l) for _, _, l in rows])
    predicted = own_logits(mnli_run["out"] / "best", [p for p, _, _ in rows], [h for _, h, _ in rows]).argmax(-1)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy(gold, predicted))
    assert result["metrics"]["r3"] == pytest.approx(r3(gold, predicted))
    categories = result["categories"]
    assert set(categories) == {"Lexical Semantics", "Logic", "Knowledge", "Domain"}  # no values: no entry
    negation = [i for i in range(18) if "Negation" in logic[i % 6].split(";")]
    scored = categories["Logic"]["values"]["Negation"]
    assert scored["examples"] == len(negation) == 6
    assert scored["r3"] == pytest.approx(r3(gold[negation], predicted[negation]))
    assert scored["accuracy"] == pytest.approx(accuracy(gold[negation], predicted[negation]))
    any_logic = [i for i in range(18) if logic[i % 6]]
    assert categories["Logic"]["examples"] == len(any_logic)
    assert categories["Logic"]["r3"] == pytest.approx(r3(gold[any_logic], predicted[any_logic]))
    assert set(categories["Lexical Semantics"]["values"]) == {"Quantifiers", "Lexical entailment",
                                                               "Morphological negation"}
    assert categories["Lexical Semantics"]["values"]["Quantifiers"]["examples"] == 8
    assert "GLUE diagnostic categories" in capsys.readouterr().out


# --- 3. predict ----------------------------------------------------------------------


def test_predict_jsonl_labels_and_probabilities(cls_run, tmp_path):
    rows = sentences(10, 5)
    path = write(tmp_path / "new.jsonl", jsonl({"text": t} for t, _ in rows))
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(path),
                 "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    logits = own_logits(cls_run["out"] / "best", [t for t, _ in rows])
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    names = ["neg", "neu", "pos"]
    assert [r["text"] for r in records] == [t for t, _ in rows]
    assert [r["label"] for r in records] == [names[i] for i in logits.argmax(-1)]
    for record, probabilities in zip(records, expected):
        assert list(record["probabilities"]) == names
        assert list(record["probabilities"].values()) == pytest.approx(probabilities, abs=1e-5)


def test_predict_glue_submission_layout(mnli_run, tiny_checkpoint, tmp_path):
    # MNLI-style model on the AX test layout: index, sentence1, sentence2.
    rows = mnli_run["rows"](7, 4)
    ax = write(tmp_path / "diagnostic.tsv", tsv([(i + 100, p, h) for i, (p, h, _) in enumerate(rows)],
                                                 ["index", "sentence1", "sentence2"]))
    assert main(["predict", "--checkpoint", str(mnli_run["out"] / "best"), "--file", str(ax),
                 "--output", str(tmp_path / "AX.tsv")]) == 0
    lines = (tmp_path / "AX.tsv").read_text().splitlines()
    predicted = own_logits(mnli_run["out"] / "best", [p for p, _, _ in rows], [h for _, h, _ in rows]).argmax(-1)
    labels = ["entailment", "neutral", "contradiction"]
    assert lines == ["index\tprediction"] + [f"{i + 100}\t{labels[k]}" for i, k in enumerate(predicted)]
    # SST-2: the GLUE server wants 0/1, not the model's names negative/positive.
    run = tmp_path / "sst2"
    assert main(["finetune", "--task", "sst2", "--data-dir", str(DEMO_DATA), "--max-train-samples", "32",
                 "--max-eval-samples", "8", "--model", str(tiny_checkpoint), "--output-dir", str(run),
                 "--max-steps", "2", *RUN]) == 0
    texts = ["a fine film", "a dull film", "not good"]
    test = write(tmp_path / "SST-2" / "test.tsv", tsv(enumerate(texts), ["index", "sentence"]))
    assert main(["predict", "--checkpoint", str(run / "best"), "--file", str(test),
                 "--output", str(tmp_path / "SST-2.tsv")]) == 0
    expected = own_logits(run / "best", texts).argmax(-1)
    assert (tmp_path / "SST-2.tsv").read_text() == "index\tprediction\n" + "".join(
        f"{i}\t{k}\n" for i, k in enumerate(expected))
    assert main(["predict", "--checkpoint", str(run / "best"), "--file", str(test), "--format", "jsonl",
                 "--output", str(tmp_path / "sst2.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "sst2.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == ["0", "1", "2"]
    assert [r["label"] for r in records] == [["negative", "positive"][k] for k in expected]


def test_predict_regression_scores(reg_run, tmp_path):
    texts = ["abc bad", "xyz zyx", "123 456"]
    path = write(tmp_path / "new.csv", csv_text([(t,) for t in texts], ["text"]))
    out = tmp_path / "scores.jsonl"
    assert main(["predict", "--checkpoint", str(reg_run["out"] / "best"), "--file", str(path),
                 "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = own_logits(reg_run["out"] / "best", texts)[:, 0]
    assert [r["text"] for r in records] == texts and "probabilities" not in records[0]
    assert [r["score"] for r in records] == pytest.approx(expected, abs=1e-5)


def test_predict_output_is_atomic(cls_run, tmp_path, capsys, monkeypatch):
    out = write(tmp_path / "pred.jsonl", "old\n")
    bad = write(tmp_path / "bad.jsonl", '{"text": "abc"}\n{"txt": "xyz"}\n')
    err = one_line_error(capsys, main(["predict", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(bad),
                                       "--output", str(out)]))
    assert f"{bad}:2: no value for column 'text'" in err
    err = one_line_error(capsys, main(["predict", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(bad),
                                       "--output", str(bad)]))
    assert "--output" in err and "is an input file" in err
    # A failure while writing (here: the rename) leaves the old file and no partial one.
    import rxf.evaluate

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rxf.evaluate.os, "replace", broken_replace)
    good = write(tmp_path / "good.jsonl", '{"text": "abc"}\n')
    with pytest.raises(OSError, match="disk full"):
        main(["predict", "--checkpoint", str(cls_run["out"] / "best"), "--file", str(good), "--output", str(out)])
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "pred.jsonl"]


# --- xnli: files it does not recognise -----------------------------------------------


def test_xnli_reads_the_diagnostic_layout_and_explains_what_it_cannot_read(tmp_path):
    full = write(tmp_path / "diagnostic-full.tsv", tsv([("", "", "Negation", "", "News", "A cat.", "No cat.",
                                                        "contradiction")], DIAGNOSTIC_HEADER))
    examples = read_language_file(full, "ax")
    assert (examples.text_a, examples.text_b, examples.labels) == (["A cat."], ["No cat."], [2])
    test = write(tmp_path / "diagnostic.tsv", tsv([(0, "A cat.", "No cat.")], ["index", "sentence1", "sentence2"]))
    with pytest.raises(DataError) as info:
        read_language_file(test, "ax")  # used to say: label 'sentence2' is not one of entailment, ...
    assert "no label column (label or gold_label) among its columns index, sentence1, sentence2" in str(info.value)
    odd = write(tmp_path / "odd.tsv", tsv([("A cat.", "No cat.", "x", "2")], ["s1", "s2", "pair", "gold"]))
    with pytest.raises(DataError, match=r"its first line is s1, s2, pair, gold; looked for .*--eval-columns xx:"):
        read_language_file(odd, "xx")
    assert read_language_file(odd, "xx", {"premise": "s1", "hypothesis": "s2", "label": "gold"}).labels == [2]
    headerless = write(tmp_path / "five.tsv", tsv([("id7", "A cat.", "No cat.", "x", "neutral")]))
    by_position = read_language_file(headerless, "xx", {"premise": "1", "hypothesis": "2", "label": "4"})
    assert (by_position.text_a, by_position.labels) == (["A cat."], [1])
    with pytest.raises(DataError, match="label 'x' is not one of entailment, neutral, contradiction, 0, 1, 2"):
        read_language_file(headerless, "xx", {"premise": "1", "hypothesis": "2", "label": "3"})


def test_xnli_eval_columns_end_to_end(mnli_run, tiny_checkpoint, tmp_path, capsys):
    rows = mnli_run["rows"](9, 8)
    odd = write(tmp_path / "xx.csv", csv_text([(p, h, l) for p, h, l in rows], ["s1", "s2", "gold"]))
    out = tmp_path / "xnli"
    args = ["xnli", "--methods", "std", "--model", str(tiny_checkpoint), "--data-dir", str(mnli_run["root"] / "data"),
            "--eval", f"xx={odd}", "--output-dir", str(out), "--max-steps", "2", *RUN]
    err = one_line_error(capsys, main(args))
    assert "cannot tell the premise, hypothesis and label columns" in err and not out.exists()
    assert main([*args, "--eval-columns", "xx:premise=s1,hypothesis=s2,label=gold"]) == 0
    report = json.loads((out / "xnli.json").read_text())
    assert report["languages"]["xx"]["examples"] == 9 and 0 <= report["methods"]["std"]["accuracy"]["xx"] <= 1
    with pytest.raises(DataError, match="unknown key 'hypo'"):
        parse_eval_columns(["hypo=s2"], ["xx"])
    with pytest.raises(Exception, match="no --eval file for language 'de'"):
        parse_eval_columns(["de:label=gold"], ["xx"])


# --- the real MiniLM -----------------------------------------------------------------


@pytest.mark.real
def test_real_minilm_on_your_own_csv(minilm_path, tmp_path):
    """Fine-tune the embedded MiniLM on a small CSV of words, then evaluate and predict."""
    good, bad = ["great", "wonderful", "superb", "lovely"], ["awful", "dreadful", "boring", "terrible"]
    rng = random.Random(0)
    rows = []
    for i in range(32):
        words, label = (good, "good") if i % 2 else (bad, "bad")
        rows.append((f"a {rng.choice(words)} film", label))
    write(tmp_path / "train.csv", csv_text(rows, ["review", "verdict"]))
    write(tmp_path / "dev.csv", csv_text(rows[:8], ["review", "verdict"]))
    run = tmp_path / "run"
    assert main(["finetune", "--data-dir", str(tmp_path), "--task", "classification", "--text-columns", "review",
                 "--label-column", "verdict", "--output-dir", str(run), "--max-steps", "4",
                 "--learning-rate", "1e-4", "--batch-size", "16", "--max-length", "16", "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert Path(results["model"]) == minilm_path and results["spec"]["labels"] == "bad,good"
    assert main(["evaluate", "--checkpoint", str(run / "best"), "--file", str(tmp_path / "dev.csv"),
                 "--output", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["files"][str(tmp_path / "dev.csv")]
    # The run's column names are looked for first; the dev metrics of the best checkpoint reappear.
    assert evaluated["text_columns"] == ["review"] and evaluated["label_column"] == "verdict"
    assert evaluated["metrics"]["accuracy"] == pytest.approx(results["best"]["dev"]["accuracy"])
    write(tmp_path / "new.csv", csv_text([("a superb film",), ("a dreadful film",)], ["review"]))
    assert main(["predict", "--checkpoint", str(run / "best"), "--file", str(tmp_path / "new.csv"),
                 "--output", str(tmp_path / "new.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert [r["text"] for r in records] == ["a superb film", "a dreadful film"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in records)


def test_label_sets_sort_integers_numerically_and_other_digits_as_text():
    from rxf.tasks.generic import discover_labels

    def rows(*labels):
        return [(line, {"label": label}) for line, label in enumerate(labels, start=2)]

    path = Path("train.tsv")
    assert discover_labels(path, rows("10", "2", "-1", "2"), "label") == ("-1", "2", "10")
    # str.isdigit says yes to circled and superscript digits, int() says no: text order, no traceback.
    assert discover_labels(path, rows("②", "①", "²"), "label") == tuple(sorted(("①", "②", "²")))
    with pytest.raises(DataError, match=r"train.tsv:3: label 'NaN' is the number of label 'nan' \(line 2\)"):
        discover_labels(path, rows("nan", "NaN", "1"), "label")


def test_jsonl_booleans_are_one_class_with_their_json_spelling():
    """A JSON writer's ``true`` and a hand-written ``"true"`` are the same class (str()
    would make them "True" and "true": two classes, no error)."""
    from rxf.tasks.generic import discover_labels, raw_labels

    rows = [(1, {"label": True}), (2, {"label": "true"}), (3, {"label": False})]
    assert raw_labels(Path("train.jsonl"), rows, "label") == ["true", "true", "false"]
    assert discover_labels(Path("train.jsonl"), rows, "label") == ("false", "true")
