"""``rxf evaluate`` and ``rxf predict``: a fine-tuned sequence classifier (a run's
``best/``, or any ``from_pretrained`` folder with a trained head) on labelled files
(the task's metrics) or on an unlabelled one (a label and probabilities, or a score, per
row).

The checkpoint says what it predicts: its config's ``id2label`` (GLUE names, or the
labels a ``--task classification`` run discovered) or a one-output regression head. The
run folder around it (``run.json`` beside ``best/``), when there is one, says the task,
the maximum length and the names of the columns it was trained on, which are looked for
first; options override them. Each file is read by its own header row (``--no-header``
and column positions for files without one).
A GLUE task's own label strings (SST-2's 0/1 for negative/positive) are read and
written as the GLUE files have them.

Evaluation files in the GLUE diagnostic layout (AX: columns ``Lexical Semantics``,
``Predicate-Argument Structure``, ``Logic``, ``Knowledge``, ``Domain``, ``Premise``,
``Hypothesis``, ``Label``; several fine-grained categories in one cell separated by
``;``) are also scored per category, with R3 (the multi-class Matthews correlation,
GLUE's diagnostic metric) beside accuracy.

Every file, column and label is checked before the model runs; outputs are written
atomically (beside, then renamed), so an error leaves no half-written file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rxf.errors import OptionError, unloadable_model
from rxf.jsonio import write_json_atomic
from rxf.models import check_model_folder
from rxf.tasks.generic import (
    DEFAULT_TEXT_COLUMNS, GenericTask, is_generic, label_ids, parse_names, resolve_columns, resolve_header, scores,
    texts,
)
from rxf.tasks.glue import GLUE_TASKS, ClassificationTask, get_task
from rxf.tasks.loading import Examples, read_records
from rxf.tables import percent

DIAGNOSTIC_CATEGORIES = ("Lexical Semantics", "Predicate-Argument Structure", "Logic", "Knowledge", "Domain")


@dataclass
class Classifier:
    """A loaded checkpoint: ``names`` are its labels in id order (``None``: regression);
    ``task`` is the GLUE task it was trained on, or a ``GenericTask`` over ``names``;
    ``run`` is the spec of the run that trained it (``{}`` when unknown)."""

    path: Path
    model: object
    tokenizer: object
    names: tuple[str, ...] | None
    task: ClassificationTask
    run: dict = field(default_factory=dict)

    @property
    def is_glue(self) -> bool:
        return not isinstance(self.task, GenericTask)


@dataclass
class Reading:
    """How input files are read: columns (``None``: detected), header row (``None``:
    from the columns), tokens per example and examples per batch."""

    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    header: bool | None = None
    max_length: int = 128
    batch_size: int = 64


# --- the checkpoint ------------------------------------------------------------------


def run_spec(checkpoint: Path) -> dict:
    """The spec in the run.json of the run folder holding ``checkpoint`` (``<run>/best``
    or ``<run>/checkpoints/checkpoint-N``), or ``{}``."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        record = folder / "run.json"
        if record.is_file():
            try:
                return json.loads(record.read_text()).get("spec", {})
            except (json.JSONDecodeError, AttributeError):
                return {}
    return {}


def load_classifier(checkpoint: str | Path, task: str | None = None, trust_remote_code: bool = False) -> Classifier:
    """The model (eval mode), tokenizer, labels and task of ``checkpoint``; a folder that
    is not a fine-tuned sequence classifier is a one-line OptionError."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(checkpoint)
    if task is not None and not is_generic(task) and task not in GLUE_TASKS:
        raise OptionError(f"--task: {task!r} is not a classification task (a GLUE task, classification, regression)")
    if not path.is_dir():
        raise OptionError(f"--checkpoint: {path} is not a folder")
    check_model_folder("--checkpoint", path)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, safetensors' errors alike
        raise unloadable_model("--checkpoint", path, exc) from None
    if info["missing_keys"]:  # e.g. a pre-trained encoder: its head would be random
        raise OptionError(f"--checkpoint: {path} has no trained classification head ({sorted(info['missing_keys'])[0]} "
                          "is missing); fine-tune it first")
    config = model.config
    regression = config.problem_type == "regression" or config.num_labels == 1
    names = None if regression else tuple(str(config.id2label[i]) for i in range(config.num_labels))
    run = run_spec(path)
    # The run's own task when it is one of these (a demo or summarisation run is not).
    known = task or (run.get("task") if is_generic(run.get("task", "")) or run.get("task") in GLUE_TASKS else None)
    return Classifier(path, model.eval(), tokenizer, names, _checkpoint_task(known, names, path), run)


def _checkpoint_task(name: str | None, names: tuple[str, ...] | None, path: Path) -> ClassificationTask:
    """The GLUE task ``name``, checked against the model's head, or else a generic task
    over the model's own labels (``names``; ``None`` for a regression head)."""
    outputs = 1 if names is None else len(names)
    if name is None or is_generic(name):
        if name is not None and (name == "regression") != (names is None):
            raise OptionError(f"--task: {path} is not a {name} model (it has {outputs} output(s))")
        regression = names is None
        return GenericTask(name="regression" if regression else "classification", folder="", text_columns=(),
                           label_column="", labels=names, label_names=names or (),
                           metric="pearson_spearman" if regression else "accuracy",
                           selected_metric="pearson" if regression else "accuracy")
    task = get_task(name)
    if outputs != task.num_labels:
        raise OptionError(f"--task: {path} has {outputs} output(s); {name} has {task.num_labels}")
    default = tuple(f"LABEL_{i}" for i in range(outputs))  # a head whose labels were never named
    if names is not None and names not in (task.label_names, task.labels, default):
        raise OptionError(f"--task: the labels of {path} are {', '.join(names)}; {name}'s are "
                          f"{', '.join(task.label_names or task.labels)}")
    return task


def label_mapping(clf: Classifier) -> dict[str, int]:
    """Label text -> id: the model's label names, and a GLUE task's label strings as its
    files have them (SST-2's "0"/"1" beside negative/positive)."""
    ids = {name: i for i, name in enumerate(clf.names or ())}
    if clf.is_glue and clf.task.labels:
        for i, label in enumerate(clf.task.labels):
            ids.setdefault(label, i)
    return ids


# --- reading files -------------------------------------------------------------------


def reading_for(clf: Classifier, text_columns: str | None = None, label_column: str | None = None,
                header: bool | None = None, max_length: int | None = None, batch_size: int = 64) -> Reading:
    """The reading options given; the maximum length defaults to the run's."""
    for option, value in (("--max-length", max_length), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise OptionError(f"{option} must be >= 1, got {value}")
    return Reading(parse_names(text_columns, "--text-columns"), label_column, header,
                   max_length or clf.run.get("max_length") or 128, batch_size)


def read_rows(clf: Classifier, path: Path, reading: Reading) -> tuple[list, bool]:
    """The rows of ``path`` and whether it has a header row. A GLUE task whose official
    files have no header (CoLA) gets its column names when the first line is no header."""
    header = resolve_header(reading.header, reading.text_columns, reading.label_column)
    rows = read_records(path, header=header)
    headerless = clf.task.headerless_columns if clf.is_glue else None
    if header and headerless and reading.text_columns is None and clf.task.text_columns[0] not in rows[0][1]:
        rows = read_records(path, headerless)
    return rows, header


def columns_of(clf: Classifier, path: Path, rows: list, header: bool, reading: Reading, need_label: bool):
    """The text columns and label column of one file: as given, else the first the file
    has of the run's own (named columns of a classification/regression run), the GLUE
    task's official ones and the common ones."""
    text_candidates, label_candidates = [], []
    if is_generic(clf.run.get("task", "")) and clf.run.get("header") and clf.run.get("text_columns"):
        text_candidates.append(tuple(parse_names(clf.run["text_columns"], "run.json text_columns")))
        label_candidates.append(clf.run["label_column"])
    if clf.is_glue:
        text_candidates.append(clf.task.text_columns)
        label_candidates.append(clf.task.label_column)
    return resolve_columns(path, rows, header, reading.text_columns, reading.label_column, need_label,
                           clf.names is None, tuple(text_candidates) + DEFAULT_TEXT_COLUMNS, tuple(label_candidates))


@dataclass
class LabelledFile:
    """One evaluation file, read and checked: (N,) texts and (N,) reference ids or scores."""

    path: Path
    rows: list
    examples: Examples
    text_columns: tuple[str, ...]
    label_column: str


def read_labelled(clf: Classifier, path: Path, reading: Reading) -> LabelledFile:
    """Read ``path`` and map its labels to the model's ids; a label the model does not
    know is refused with its file and line."""
    rows, header = read_rows(clf, path, reading)
    text_columns, label_column = columns_of(clf, path, rows, header, reading, need_label=True)
    first, second = texts(path, rows, text_columns)
    if clf.names is None:
        references = scores(path, rows, label_column)
    else:
        references = label_ids(path, rows, label_column, label_mapping(clf), f"the labels of {clf.path}")
    return LabelledFile(path, rows, Examples(first, second, references, str(path)), text_columns, label_column)


# --- inference -----------------------------------------------------------------------


def predict_logits(clf: Classifier, examples: Examples, reading: Reading) -> np.ndarray:
    """(N, C) logits in input order (C = 1 for regression), batched with the model in
    eval mode and without gradients. Examples are batched by length, so that each batch
    is padded only to its own longest sequence (dynamic padding wastes little then)."""
    import torch

    from rxf.tasks.tokenize import tokenize

    # Not cached: a file evaluated or predicted once is tokenised faster than the model
    # runs on it, and caching would copy every such file into the cache folder.
    encoded = tokenize(examples, clf.tokenizer, reading.max_length, use_cache=False).remove_columns("labels")
    features = encoded.to_list()
    order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = clf.model.to(device).eval()
    logits = np.zeros((len(features), model.config.num_labels), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), reading.batch_size):
            chunk = order[start:start + reading.batch_size]
            batch = clf.tokenizer.pad([features[i] for i in chunk], return_tensors="pt").to(device)
            logits[chunk] = model(**batch).logits.float().cpu().numpy()
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) probabilities."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def point_predictions(clf: Classifier, logits: np.ndarray) -> np.ndarray:
    """(N,) predicted ids, or scores for regression."""
    return logits[:, 0] if clf.names is None else logits.argmax(axis=-1)


# --- evaluate ------------------------------------------------------------------------


def r3(references, predictions) -> float:
    """R3, GLUE's diagnostic metric: the Matthews correlation generalised to several
    classes (0 where a category's rows all have one label and one prediction)."""
    import warnings

    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():  # sklearn warns on such single-label subsets
        warnings.simplefilter("ignore", UserWarning)
        return float(matthews_corrcoef(references, predictions))


def diagnostic_scores(rows: list, categories: list[str], predicted: np.ndarray, references: np.ndarray) -> dict:
    """Per diagnostic column (coarse category): R3 and accuracy over the rows that have
    any value in it, and the same per fine-grained value (a cell may hold several,
    separated by ';')."""
    def score(index: list[int]) -> dict:
        gold, guess = references[index], predicted[index]
        return {"examples": len(index), "r3": r3(gold, guess), "accuracy": float(np.mean(gold == guess))}

    result = {}
    for column in categories:
        by_value = defaultdict(list)
        for i, (_, row) in enumerate(rows):
            for value in {v.strip() for v in str(row.get(column) or "").split(";") if v.strip()}:
                by_value[value].append(i)
        every = sorted({i for index in by_value.values() for i in index})
        if every:
            result[column] = {**score(every), "values": {v: score(ix) for v, ix in sorted(by_value.items())}}
    return result


def evaluate_file(clf: Classifier, data: LabelledFile, reading: Reading) -> dict:
    """The task's metrics on one file (and per diagnostic category where it has them)."""
    predicted = point_predictions(clf, predict_logits(clf, data.examples, reading))
    references = np.asarray(data.examples.labels)
    result = {"examples": len(references), "text_columns": list(data.text_columns), "label_column": data.label_column,
              "metrics": clf.task.compute_metrics(predicted, references)}
    categories = [c for c in DIAGNOSTIC_CATEGORIES if c in data.rows[0][1]]
    if categories and clf.names is not None:
        result["metrics"]["r3"] = r3(references, predicted)
        result["categories"] = diagnostic_scores(data.rows, categories, predicted, references)
    return result


def run_evaluate(clf: Classifier, files: list[str], output: str | Path, reading: Reading) -> dict:
    """Evaluate on every file (all read and checked first); write the JSON report."""
    output = check_output(output, files)
    labelled = {name: read_labelled(clf, Path(name), reading) for name in files}
    report = {
        "checkpoint": str(clf.path), "task": clf.task.name, "labels": list(clf.names) if clf.names else None,
        "max_length": reading.max_length,
        "files": {name: evaluate_file(clf, data, reading) for name, data in labelled.items()},
    }
    write_json_atomic(output, report)
    return report


def evaluation_table(report: dict) -> str:
    """Metrics ×100 per file, then each diagnostic file's categories."""
    metrics = list(dict.fromkeys(m for f in report["files"].values() for m in f["metrics"]))
    lines = ["| file | examples | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, result in report["files"].items():
        cells = [percent(result["metrics"].get(m)) for m in metrics]
        lines.append(f"| {name} | {result['examples']} | " + " | ".join(cells) + " |")
    for name, result in report["files"].items():
        if "categories" in result:
            lines += ["", f"GLUE diagnostic categories of {name} (×100)", "",
                      "| category | examples | R3 | accuracy |", "|---|---|---|---|"]
            for column, scored in result["categories"].items():
                lines.append(f"| **{column}** | {scored['examples']} | {percent(scored['r3'])} | "
                             f"{percent(scored['accuracy'])} |")
                for value, s in scored["values"].items():
                    lines.append(f"| {value} | {s['examples']} | {percent(s['r3'])} | {percent(s['accuracy'])} |")
    return "\n".join(lines) + "\n"


# --- predict -------------------------------------------------------------------------


def output_format(clf: Classifier, rows: list, requested: str) -> str:
    """``glue`` (index<TAB>prediction) for a GLUE task's test file (it has an ``index``
    column), else ``jsonl``; or what was asked."""
    if requested != "auto":
        return requested
    return "glue" if clf.is_glue and "index" in rows[0][1] else "jsonl"


def prediction_strings(clf: Classifier, predicted: np.ndarray) -> list[str]:
    """What the GLUE server expects in the prediction column: a GLUE task's own label
    strings (SST-2: 0/1), else the model's label names; scores with three decimals."""
    if clf.names is None:
        return [f"{score:.3f}" for score in predicted]
    labels = clf.task.labels if clf.is_glue else clf.names
    return [labels[i] for i in predicted]


def glue_lines(rows: list, predictions: list[str]) -> list[str]:
    """The GLUE submission layout; rows are numbered 0.. where the file has no index."""
    index = [row.get("index", i) for i, (_, row) in enumerate(rows)]
    return ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(index, predictions)]


def jsonl_lines(clf: Classifier, rows: list, examples: Examples, logits: np.ndarray) -> list[str]:
    """One JSON object per row: its text (and text_pair), then label and probabilities
    by label name, or score."""
    lines = []
    probabilities = None if clf.names is None else softmax(logits.astype(np.float64))
    for i, (_, row) in enumerate(rows):
        record = {"index": row["index"]} if "index" in row else {}
        record["text"] = examples.text_a[i]
        if examples.text_b is not None:
            record["text_pair"] = examples.text_b[i]
        if probabilities is None:
            record["score"] = float(logits[i, 0])
        else:
            record["label"] = clf.names[int(probabilities[i].argmax())]
            record["probabilities"] = {name: round(float(p), 6) for name, p in zip(clf.names, probabilities[i])}
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines


def run_predict(clf: Classifier, file: str, output: str | Path, reading: Reading, fmt: str = "auto") -> dict:
    """Predict every row of ``file``; write ``output`` atomically. Returns a summary."""
    output = check_output(output, [file])
    path = Path(file)
    rows, header = read_rows(clf, path, reading)
    text_columns, _ = columns_of(clf, path, rows, header, reading, need_label=False)
    first, second = texts(path, rows, text_columns)
    examples = Examples(first, second, [0] * len(first), str(path))
    chosen = output_format(clf, rows, fmt)
    logits = predict_logits(clf, examples, reading)
    if chosen == "glue":
        lines = glue_lines(rows, prediction_strings(clf, point_predictions(clf, logits)))
    else:
        lines = jsonl_lines(clf, rows, examples, logits)
    write_text_atomic(output, "\n".join(lines) + "\n")
    return {"file": file, "rows": len(rows), "format": chosen, "text_columns": list(text_columns),
            "output": str(output)}


# --- output --------------------------------------------------------------------------


def check_output(output: str | Path, inputs: list[str]) -> Path:
    """``--output`` must be a file in an existing folder, and not one of the inputs."""
    output = Path(output)
    if output.is_dir():
        raise OptionError(f"--output: {output} is a folder; name a file")
    if not output.parent.is_dir():
        raise OptionError(f"--output: folder {output.parent} does not exist")
    if any(Path(name).resolve() == output.resolve() for name in inputs):
        raise OptionError(f"--output: {output} is an input file; it would be overwritten")
    return output


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: a reader never sees half a file, and
    an error while writing leaves no file behind."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
