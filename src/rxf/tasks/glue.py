"""GLUE task definitions: input columns, label sets, official metrics.

Label ids follow the Hugging Face ``nyu-mll/glue`` dataset (the order of ``labels``
below), so a model fine-tuned on local files and one fine-tuned on hub data agree.
Metrics follow the GLUE definitions: accuracy; F1 and accuracy for MRPC and QQP;
Matthews correlation for CoLA; Pearson and Spearman correlation for STS-B.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rxf.errors import OptionError


@dataclass(frozen=True)
class ClassificationTask:
    """A sentence or sentence-pair classification (or regression) task.

    Attributes:
        name: lower-case task name used on the command line (``sst2``).
        folder: the task's folder in the official GLUE layout (``SST-2``).
        text_columns: one or two input columns, as named in the official files.
        label_column: the label column in the official files.
        labels: the label strings as they appear in the official files, in the order
            of their ids; ``None`` for a regression task.
        metric: ``accuracy``, ``f1_accuracy``, ``matthews`` or ``pearson_spearman``.
        dev_splits: file stems of the evaluation splits; the first one selects the
            best checkpoint, the others are optional.
        headerless_columns: column names for files without a header row (CoLA).
        hub_config, hub_text_columns, hub_dev_splits: the same on the Hugging Face hub.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metric: str
    dev_splits: tuple[str, ...] = ("dev",)
    headerless_columns: tuple[str, ...] | None = None
    hub_dataset: str = "nyu-mll/glue"
    hub_config: str | None = None
    hub_text_columns: tuple[str, ...] = ()
    hub_dev_splits: tuple[str, ...] = ("validation",)
    label_names: tuple[str, ...] = field(default=())

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def main_metric(self) -> str:
        """The metric that selects the best checkpoint."""
        return {"accuracy": "accuracy", "f1_accuracy": "accuracy", "matthews": "matthews_correlation",
                "pearson_spearman": "pearson"}[self.metric]

    def compute_metrics(self, predictions, references) -> dict[str, float]:
        """Metrics from (N,) predicted labels (or scores) and (N,) references."""
        return compute_metric(self.metric, predictions, references)


def compute_metric(metric: str, predictions, references) -> dict[str, float]:
    """GLUE metrics, as fractions in [0, 1] (correlations in [-1, 1])."""
    # Imported here: the task table is read by the CLI's --help, which should not wait for them.
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, references = np.asarray(predictions), np.asarray(references)
    if metric == "pearson_spearman":
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearman": float(spearmanr(predictions, references)[0]),
        }
    result = {"accuracy": float(accuracy_score(references, predictions))}
    if metric == "f1_accuracy":
        result["f1"] = float(f1_score(references, predictions))
    elif metric == "matthews":
        result["matthews_correlation"] = float(matthews_corrcoef(references, predictions))
    return result


_BINARY = ("0", "1")
_NLI = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, ClassificationTask] = {
    t.name: t
    for t in (
        ClassificationTask("cola", "CoLA", ("sentence",), "label", _BINARY, "matthews",
                           headerless_columns=("source", "label", "original_label", "sentence"),
                           hub_config="cola", hub_text_columns=("sentence",),
                           label_names=("unacceptable", "acceptable")),
        ClassificationTask("sst2", "SST-2", ("sentence",), "label", _BINARY, "accuracy",
                           hub_config="sst2", hub_text_columns=("sentence",), label_names=("negative", "positive")),
        ClassificationTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, "f1_accuracy",
                           hub_config="mrpc", hub_text_columns=("sentence1", "sentence2"),
                           label_names=("not_equivalent", "equivalent")),
        ClassificationTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, "pearson_spearman",
                           hub_config="stsb", hub_text_columns=("sentence1", "sentence2")),
        ClassificationTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, "f1_accuracy",
                           hub_config="qqp", hub_text_columns=("question1", "question2"),
                           label_names=("not_duplicate", "duplicate")),
        ClassificationTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
                           ("entailment", "neutral", "contradiction"), "accuracy",
                           dev_splits=("dev_matched", "dev_mismatched"),
                           hub_config="mnli", hub_text_columns=("premise", "hypothesis"),
                           hub_dev_splits=("validation_matched", "validation_mismatched")),
        ClassificationTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI, "accuracy",
                           hub_config="qnli", hub_text_columns=("question", "sentence")),
        ClassificationTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI, "accuracy",
                           hub_config="rte", hub_text_columns=("sentence1", "sentence2")),
        ClassificationTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, "accuracy",
                           hub_config="wnli", hub_text_columns=("sentence1", "sentence2"),
                           label_names=("not_entailment", "entailment")),
    )
}


def get_task(name: str) -> ClassificationTask:
    try:
        return GLUE_TASKS[name]
    except KeyError:
        raise OptionError(f"--task: unknown task {name!r}; choose from {', '.join(GLUE_TASKS)}") from None
