"""Classification and regression on your own files: ``--task classification`` (or
``regression``) with ``--train-file``/``--dev-file`` (or ``--data-dir`` holding
``train.*`` and ``dev.*``), in CSV, TSV or JSONL, each optionally gzipped.

How a file is read:
- columns by name from its header row (a JSONL row's fields), or by 0-based position in a
  .tsv/.csv file without one (``--no-header``, implied when the columns are given as
  numbers: ``--text-columns 0,1 --label-column 2``);
- text: ``--text-columns`` (one column, or two for sentence pairs), by default the first of
  ``DEFAULT_TEXT_COLUMNS`` the file has (case-insensitive); without a header, every
  column but the label;
- label: ``--label-column``, by default ``label`` (regression: ``label`` or ``score``);
  without a header, the last column;
- label set: ``--labels a,b,c`` in id order, or the training file's labels sorted
  (numerically when they are all integers). A dev label outside it is refused with its
  file and line. Regression labels are numbers.

The result is a ``GenericTask`` — a ``ClassificationTask`` whose label set and columns
come from the files — and the splits as ``Examples``; ``settle_spec`` writes the resolved
columns and label set back into the run's spec, so that they are part of its identity
(run.json) and of results.json. Metrics: accuracy and macro-F1 (classification),
Pearson and Spearman correlation (regression); ``--main-metric`` picks the one that
selects the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from rxf.errors import DataError, OptionError
from rxf.tasks.glue import ClassificationTask
from rxf.tasks.loading import Examples, find_split_file, read_records, table_format

GENERIC_TASKS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
REGRESSION_METRICS = ("pearson", "spearman")
# Pairs first: a file with sentence1 and sentence2 is a pair task even if it also has `text`.
DEFAULT_TEXT_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                        ("text_a", "text_b"), ("text",), ("sentence",))


def is_generic(name: str) -> bool:
    return name in GENERIC_TASKS


@dataclass(frozen=True)
class GenericTask(ClassificationTask):
    """A task defined by the user's files. ``labels`` (id order) are discovered from the
    training file or given; ``None`` for regression. ``header`` says whether the files
    have a header row; ``selected_metric`` selects the best checkpoint."""

    header: bool = True
    selected_metric: str = "accuracy"

    @property
    def main_metric(self) -> str:
        return self.selected_metric

    def compute_metrics(self, predictions, references) -> dict[str, float]:
        """(N,) predicted ids (or scores) and (N,) references -> the task's metrics."""
        return generic_metrics(self.is_regression, predictions, references)


def generic_metrics(regression: bool, predictions, references) -> dict[str, float]:
    """Accuracy and macro-F1 (over the labels that occur in either array), or Pearson
    and Spearman correlation; fractions, correlations in [-1, 1]."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score

    predictions, references = np.asarray(predictions), np.asarray(references)
    if regression:
        return {"pearson": float(pearsonr(predictions, references)[0]),
                "spearman": float(spearmanr(predictions, references)[0])}
    return {"accuracy": float(accuracy_score(references, predictions)),
            "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}


# --- options -------------------------------------------------------------------------


def parse_names(text: str | None, option: str) -> tuple[str, ...] | None:
    """"a, b" -> ("a", "b"); ``None`` stays ``None``; an empty list is refused."""
    if text is None:
        return None
    names = tuple(item.strip() for item in text.split(","))
    if not all(names):
        raise OptionError(f"{option}: empty name in {text!r} (expected comma-separated names)")
    return names


def resolve_header(header: bool | None, text_columns, label_column) -> bool:
    """Whether the files have a header row: as told, else no when every column given is
    a position (a number). Without a header, columns must be positions."""
    given = list(text_columns or ()) + ([label_column] if label_column else [])
    if header is None:
        return not (given and all(name.isdigit() for name in given))
    if not header:
        for name in given:
            if not name.isdigit():
                option = "--label-column" if name == label_column else "--text-columns"
                raise OptionError(f"{option}: {name!r} is not a column position (0, 1, ...), which is what a file "
                                  "without a header row (--no-header) has")
    return header


def check_options(spec) -> None:
    """Refuse generic-task options that do not fit the task."""
    if spec.columns is not None:
        raise OptionError(f"--columns maps a GLUE task's columns; for --task {spec.task} name them with "
                          "--text-columns and --label-column")
    regression = spec.task == "regression"
    metrics = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    if spec.main_metric is not None and spec.main_metric not in metrics:
        raise OptionError(f"--main-metric: {spec.main_metric!r} is not a {spec.task} metric; choose from "
                          f"{', '.join(metrics)}")
    if regression and spec.labels is not None:
        raise OptionError("--labels: a regression task has scores, not a label set")
    text = parse_names(spec.text_columns, "--text-columns")
    if text is not None and len(text) > 2:
        raise OptionError(f"--text-columns: one column, or two for sentence pairs; got {len(text)}")
    labels = parse_names(spec.labels, "--labels")
    if labels is not None and len(set(labels)) < len(labels):
        raise OptionError(f"--labels: a label is named twice in {spec.labels!r}")
    if labels is not None and len(labels) < 2:
        raise OptionError("--labels: classification needs at least two labels")


# --- columns -------------------------------------------------------------------------


def find_column(present: list[str], name: str) -> str | None:
    """``name`` among the file's columns: exactly, else the one column equal to it
    ignoring case (``Label`` for ``label``)."""
    if name in present:
        return name
    matches = [column for column in present if column.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def resolve_columns(path: Path, rows: list, header: bool, text_columns=None, label_column=None,
                    need_label: bool = True, regression: bool = False,
                    candidates: tuple = DEFAULT_TEXT_COLUMNS, label_candidates: tuple = ()
                    ) -> tuple[tuple[str, ...], str | None]:
    """The file's text column(s) and label column (``None`` when ``need_label`` is false
    and none is named), as named in ``rows`` (positions as "0", "1", ... without a header).
    Unnamed ones are the first of ``candidates`` (text) and of ``label_candidates``, then
    ``label`` (and ``score`` for regression), that the file has."""
    first = rows[0][1]
    present = list(first)
    # Column problems are the header's: line 1, or a JSONL file's first row.
    lineno = rows[0][0] if table_format(path) == ".jsonl" else 1
    if not header:
        return _positional_columns(path, len(present), text_columns, label_column, need_label)
    shown = ", ".join(present)
    label = None
    if label_column is not None or need_label:
        wanted = [label_column] if label_column else [*label_candidates, "label", *(["score"] if regression else [])]
        label = next((found for name in wanted if (found := find_column(present, name))), None)
        if label is None:
            raise DataError(f"{path}:{lineno}: no label column {' or '.join(map(repr, dict.fromkeys(wanted)))}; the file has "
                            f"{shown} (name it with --label-column; --no-header for a file without a header row)")
    if text_columns:
        found = [find_column(present, name) for name in text_columns]
        missing = [name for name, column in zip(text_columns, found) if column is None]
        if missing:
            raise DataError(f"{path}:{lineno}: no column {', '.join(map(repr, missing))} (--text-columns); "
                            f"the file has {shown}")
        if label in found:
            raise OptionError(f"--text-columns: {label!r} is the label column")
        return tuple(found), label
    for names in candidates:
        found = [find_column(present, name) for name in names]
        if all(found) and label not in found:
            return tuple(found), label
    raise DataError(f"{path}:{lineno}: cannot tell the text column(s): the file has {shown}; name them with "
                    "--text-columns (one, or two for sentence pairs; --no-header for a file without a header row)")


def _positional_columns(path: Path, count: int, text_columns, label_column, need_label: bool):
    """Columns of a headerless file: positions as given, else the label last and the
    text in the one or two columns before it."""
    text_columns = tuple(str(int(name)) for name in text_columns) if text_columns else None  # "01" is 1
    label_column = str(int(label_column)) if label_column else None
    for name in list(text_columns or ()) + ([label_column] if label_column else []):
        if int(name) >= count:
            raise DataError(f"{path}:1: no column at position {name}: the first row has {count} fields (0-{count - 1})")
    if label_column or not need_label:
        label = label_column
    else:  # the last column that is not text
        label = next((str(i) for i in reversed(range(count)) if str(i) not in (text_columns or ())), None)
        if label is None:
            raise OptionError("--label-column: every column is a text column; say which holds the label")
    if text_columns:
        if label in text_columns:
            raise OptionError(f"--text-columns: position {label} is the label column")
        return tuple(text_columns), label
    text = tuple(str(i) for i in range(count) if str(i) != label)
    if len(text) not in (1, 2):
        raise DataError(f"{path}:1: {count} fields per row; say which hold the text with --text-columns "
                        "(positions, e.g. 0,1) and which the label with --label-column")
    return text, label


# --- rows -> examples ----------------------------------------------------------------


def _field(path: Path, lineno: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:  # a JSONL row without the field, or with null
        raise DataError(f"{path}:{lineno}: no value for column {column!r}")
    if isinstance(value, (list, dict)):  # str() would make "['a', 'b']" a text or a class
        raise DataError(f"{path}:{lineno}: column {column!r} holds a JSON {'list' if isinstance(value, list) else 'object'}"
                        ", not a text, label or number")
    if isinstance(value, bool):  # JSON's spelling, so that true and "true" are one class
        return "true" if value else "false"
    return str(value)


def texts(path: Path, rows: list, text_columns: tuple[str, ...]) -> tuple[list[str], list[str] | None]:
    """The (N,) first texts and the (N,) second texts (``None`` for single texts)."""
    first = [_field(path, lineno, row, text_columns[0]) for lineno, row in rows]
    second = [_field(path, lineno, row, text_columns[1]) for lineno, row in rows] if len(text_columns) > 1 else None
    return first, second


def raw_labels(path: Path, rows: list, label_column: str) -> list[str]:
    """Each row's label as text (a JSONL 1 is "1"), stripped; an empty one is refused."""
    values = []
    for lineno, row in rows:
        value = _field(path, lineno, row, label_column).strip()
        if not value:
            raise DataError(f"{path}:{lineno}: empty label in column {label_column!r}")
        values.append(value)
    return values


def scores(path: Path, rows: list, label_column: str) -> list[float]:
    """Each row's label as a finite number (regression)."""
    values = []
    for (lineno, _), text in zip(rows, raw_labels(path, rows, label_column)):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(f"{path}:{lineno}: score {text!r} is not a finite number (--task regression)")
        values.append(value)
    return values


def label_ids(path: Path, rows: list, label_column: str, ids: dict[str, int], known: str) -> list[int]:
    """Each row's label id through ``ids`` (label text -> id); a label not in it is
    refused with its file and line. ``known`` says where the label set comes from."""
    result = []
    for (lineno, _), value in zip(rows, raw_labels(path, rows, label_column)):
        if value not in ids:
            raise DataError(f"{path}:{lineno}: label {value!r} is not one of {', '.join(ids)} ({known})")
        result.append(ids[value])
    return result


def _refuse_one_label_written_twice(path: Path, rows: list, values: list[str]) -> None:
    """Labels are classes by their text, so ``1`` and ``1.0`` (a JSON writer's or a
    spreadsheet's doing), or ``Pos`` and ``pos``, would silently become two classes: refuse
    them, naming both lines. A label set given with --labels is taken as it is."""
    first_line = {}
    for (line, _), value in zip(rows, values):
        try:
            number = float(value)
            # NaN equals nothing, itself included: one key for every spelling of it.
            key, kind = ("nan" if math.isnan(number) else number), "the number of label"
        except ValueError:
            key, kind = value.casefold(), "label"
        seen = first_line.setdefault(key, (value, line))
        if seen[0] != value:
            raise DataError(f"{path}:{line}: label {value!r} is {kind} {seen[0]!r} (line {seen[1]}) written another "
                            "way; write each label one way (or give the set with --labels)")


def discover_labels(path: Path, rows: list, label_column: str) -> tuple[str, ...]:
    """The training file's label set, sorted (numerically when every label is an
    integer, so that 2 comes before 10)."""
    values = raw_labels(path, rows, label_column)
    found = set(values)
    for value in sorted(found):
        if "," in value:  # run.json and --labels keep the set as comma-separated text
            line = rows[values.index(value)][0]
            raise DataError(f"{path}:{line}: label {value!r} holds a comma, which rxf uses to separate labels")
    _refuse_one_label_written_twice(path, rows, values)
    if len(found) < 2:
        raise DataError(f"{path}: only one label ({values[0]!r}) in the training file; classification needs two or "
                        "more (give the whole set with --labels)")
    numeric = all(_integer(value) is not None for value in found)
    return tuple(sorted(found, key=lambda v: (_integer(v), v)) if numeric else sorted(found))


def _integer(text: str) -> int | None:
    """``text`` as an integer, or None (``str.isdigit`` also accepts ① and ², which ``int`` refuses)."""
    try:
        return int(text)
    except ValueError:
        return None


# --- the task and its splits ---------------------------------------------------------


def split_paths(spec) -> tuple[Path, Path]:
    """The training and dev files: ``--train-file``/``--dev-file``, else ``train.*`` and
    ``dev.*`` in ``--data-dir``."""
    paths = []
    for split, given in (("train", spec.train_file), ("dev", spec.dev_file)):
        if given:
            paths.append(Path(given))
            continue
        if spec.data_dir is None:
            raise OptionError(f"--{split}-file: --task {spec.task} reads your own files: give --train-file and "
                              "--dev-file (or --data-dir with train.* and dev.*)")
        found = find_split_file(_NO_FOLDER, Path(spec.data_dir), split)
        if found is None:
            raise DataError(f"no {split} file in {spec.data_dir}: looked for {split}.tsv, {split}.csv, {split}.jsonl "
                            f"(or the same .gz); or name it with --{split}-file")
        paths.append(found)
    return paths[0], paths[1]


# find_split_file looks in data_dir/<task folder> and data_dir: with no folder, data_dir alone.
_NO_FOLDER = ClassificationTask(name="", folder="", text_columns=(), label_column="", labels=None, metric="accuracy")


def load_generic(spec) -> tuple[GenericTask, dict[str, Examples]]:
    """The task defined by ``spec``'s files and options, and its {"train", "dev"} splits
    (whole; the caller truncates). The dev file is read with the training file's columns."""
    check_options(spec)
    if spec.data_dir is not None and not Path(spec.data_dir).is_dir():
        raise OptionError(f"--data-dir: {spec.data_dir} is not a folder")
    regression = spec.task == "regression"
    text_columns, label_column = parse_names(spec.text_columns, "--text-columns"), spec.label_column
    header = resolve_header(spec.header, text_columns, label_column)
    train_path, dev_path = split_paths(spec)
    train_rows = read_records(train_path, header=header)
    text_columns, label_column = resolve_columns(train_path, train_rows, header, text_columns, label_column,
                                                 regression=regression)
    dev_rows = read_records(dev_path, header=header)
    # The training file's columns, found in the dev file (which may spell them in another case).
    dev_columns = resolve_columns(dev_path, dev_rows, header, text_columns, label_column)
    labels = None if regression else (parse_names(spec.labels, "--labels")
                                      or discover_labels(train_path, train_rows, label_column))
    task = GenericTask(
        name=spec.task, folder="", text_columns=text_columns, label_column=label_column, labels=labels,
        metric="pearson_spearman" if regression else "accuracy", label_names=labels or (), header=header,
        selected_metric=spec.main_metric or ("pearson" if regression else "accuracy"),
    )
    known = "--labels" if spec.labels else f"the labels of {train_path}"
    splits = {"train": _examples(task, train_path, train_rows, (text_columns, label_column), known),
              "dev": _examples(task, dev_path, dev_rows, dev_columns, known)}
    return task, splits


def _examples(task: GenericTask, path: Path, rows: list, columns: tuple, known: str) -> Examples:
    (text_columns, label_column) = columns
    first, second = texts(path, rows, text_columns)
    if task.is_regression:
        labels = scores(path, rows, label_column)
    else:
        labels = label_ids(path, rows, label_column, {name: i for i, name in enumerate(task.labels)}, known)
    return Examples(first, second, labels, str(path))


def settle_spec(spec, task: ClassificationTask):
    """``spec`` with a generic task's resolved columns, header, label set and main metric
    written in: what the run is defined by (run.json) whether given or discovered."""
    if not isinstance(task, GenericTask):
        return spec
    return dataclasses.replace(
        spec, text_columns=",".join(task.text_columns), label_column=task.label_column, header=task.header,
        labels=",".join(task.labels) if task.labels else None, main_metric=task.main_metric,
    )
