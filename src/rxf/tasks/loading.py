"""Task data from local files (official GLUE TSVs, CSV, JSONL) or the Hugging Face hub,
checked row by row, into a plain ``Examples`` structure.

Local layout: ``--data-dir`` is either the GLUE root (holding ``SST-2/``, ``RTE/``, ...)
or a folder holding the split files itself (``train.tsv``, ``dev.jsonl``, ...). Official
GLUE TSVs are read as tab-separated text with quoting off (quotes are part of the text),
a UTF-8 byte-order mark is dropped (MRPC) and CoLA's headerless files get their column
names. Files with other column names are read through a column mapping; the common
``text_a``/``text_b``/``label`` layout (LM-BFF k-shot, ``glue_pretrain`` JSONL) is
recognised without one. Every problem is reported with the file and line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from rxf.errors import DataError
from rxf.tasks.glue import ClassificationTask

SUFFIXES = (".tsv", ".jsonl", ".csv")
_GENERIC_COLUMNS = ("text_a", "text_b", "label")


@dataclass
class Examples:
    """One split: texts (N,) and optional second texts (N,), labels (N,) as class ids
    (int) or scores (float), and where the data came from."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list
    source: str

    def __len__(self) -> int:
        return len(self.text_a)

    def head(self, n: int | None) -> "Examples":
        if n is None or n >= len(self):
            return self
        return Examples(self.text_a[:n], self.text_b[:n] if self.text_b else None, self.labels[:n], self.source)


def read_records(path: Path, headerless_columns: tuple[str, ...] | None = None) -> list[tuple[int, dict]]:
    """Rows of a .tsv, .csv or .jsonl file as (line number, {column: value})."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".csv":
        rows = _read_csv(path)
    elif suffix in (".tsv", ".txt"):
        rows = _read_tsv(path, headerless_columns)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .tsv, .csv or .jsonl)")
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def _read_tsv(path: Path, headerless_columns) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if headerless_columns is None:
        header, start = lines[0].rstrip("\r").split("\t"), 2
        body = lines[1:]
    else:
        header, start, body = list(headerless_columns), 1, lines
    for lineno, line in enumerate(body, start=start):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, found {len(fields)}")
        rows.append((lineno, dict(zip(header, fields))))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(fields)}")
            rows.append((reader.line_num, dict(zip(header, fields))))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append((lineno, record))
    return rows


def parse_column_map(spec: str | None, option: str = "--columns") -> dict[str, str]:
    """``"sentence1=text_a,label=gold"`` -> {"sentence1": "text_a", "label": "gold"}."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        if "=" not in item:
            raise DataError(f"{option}: expected KEY=VALUE items separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        mapping[key.strip()] = value.strip()
    return mapping


def examples_from_file(
    task: ClassificationTask,
    path: Path,
    column_map: dict[str, str] | None = None,
    label_map: dict[str, str] | None = None,
) -> Examples:
    """Read one split file of ``task`` and check every row's label. ``label_map`` renames
    the file's labels to the task's (e.g. {"0": "entailment"}) before they are checked."""
    tab_separated = Path(path).suffix.lower() in (".tsv", ".txt")
    headerless = task.headerless_columns if tab_separated and _lacks_header(path, task) else None
    rows = read_records(Path(path), headerless)
    wanted = list(task.text_columns) + [task.label_column]
    mapping = {c: c for c in wanted}
    present = set(rows[0][1])
    if not set(wanted) <= present and set(_GENERIC_COLUMNS[: len(task.text_columns)] + ("label",)) <= present:
        mapping = dict(zip(list(task.text_columns), _GENERIC_COLUMNS)) | {task.label_column: "label"}
    mapping.update(column_map or {})
    missing = [mapping[c] for c in wanted if mapping[c] not in present]
    if missing:
        raise DataError(
            f"{path}:{rows[0][0]}: missing column(s) {', '.join(missing)}; the file has "
            f"{', '.join(sorted(present))}. Map them with --columns, e.g. "
            f"--columns {task.text_columns[0]}=YOUR_COLUMN,{task.label_column}=YOUR_LABEL"
        )
    text_cols = [mapping[c] for c in task.text_columns]
    label_col = mapping[task.label_column]
    text_a, text_b, labels = [], [] if len(text_cols) > 1 else None, []
    for lineno, row in rows:
        text_a.append(str(row[text_cols[0]]))
        if text_b is not None:
            text_b.append(str(row[text_cols[1]]))
        value = row[label_col]
        if label_map:
            value = label_map.get(str(value).strip(), value)
        labels.append(_parse_label(task, value, path, lineno))
    return Examples(text_a, text_b, labels, str(path))


def _lacks_header(path: Path, task: ClassificationTask) -> bool:
    """CoLA's official files have no header row: its first line starts with a source id."""
    if task.headerless_columns is None:
        return False
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline().rstrip("\r\n").split("\t")
    return task.text_columns[0] not in first and "text_a" not in first


def _parse_label(task: ClassificationTask, value, path, lineno: int):
    if task.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}:{lineno}: score {value!r} is not a number") from None
    text = str(value).strip()
    if text not in task.labels:
        raise DataError(f"{path}:{lineno}: label {text!r} is not one of {', '.join(task.labels)} ({task.name})")
    return task.labels.index(text)


def find_split_file(task: ClassificationTask, data_dir: Path, split: str) -> Path | None:
    """``data_dir/<TaskFolder>/<split>.{tsv,jsonl,csv}`` or ``data_dir/<split>.*``."""
    for folder in (Path(data_dir) / task.folder, Path(data_dir)):
        for suffix in SUFFIXES:
            candidate = folder / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _missing_split(task: ClassificationTask, data_dir: Path, split: str) -> DataError:
    folder = Path(data_dir) / task.folder
    folder = folder if folder.is_dir() else Path(data_dir)
    looked = ", ".join(f"{split}{s}" for s in SUFFIXES)
    hints = sorted(
        str(p.parent.relative_to(folder)) for s in SUFFIXES for p in folder.glob(f"**/{split}{s}") if p.parent != folder
    ) if folder.is_dir() else []
    hint = f"; folders below it that have one: {', '.join(hints)} (pass one as --data-dir)" if hints else ""
    where = folder if folder.is_dir() else f"{data_dir} (folder not found)"
    return DataError(f"no {split} split for {task.name} in {where}: looked for {looked}{hint}")


def load_local(
    task: ClassificationTask,
    data_dir: Path,
    column_map: dict[str, str] | None = None,
    train_file: Path | None = None,
    dev_file: Path | None = None,
) -> dict[str, Examples]:
    """{"train": ..., "<dev split>": ...} from a local folder (or explicit files).

    The first dev split of the task is required; further ones (MNLI mismatched) are
    read when present."""
    splits: dict[str, Examples] = {}
    train_path = Path(train_file) if train_file else find_split_file(task, data_dir, "train")
    if train_path is None:
        raise _missing_split(task, data_dir, "train")
    splits["train"] = examples_from_file(task, train_path, column_map)
    if dev_file:
        splits[task.dev_splits[0]] = examples_from_file(task, Path(dev_file), column_map)
        return splits
    for i, split in enumerate(task.dev_splits):
        path = find_split_file(task, data_dir, split)
        if path is None and split != "dev":
            path = find_split_file(task, data_dir, "dev") if i == 0 else None
        if path is None:
            if i == 0:
                raise _missing_split(task, data_dir, split)
            continue
        splits[split] = examples_from_file(task, path, column_map)
    return splits


def load_hub(task: ClassificationTask, trust_remote_code: bool = False) -> dict[str, Examples]:
    """The task from the Hugging Face hub through ``datasets.load_dataset`` (needs
    network, or a populated datasets cache). Labels are the hub's ids already."""
    from datasets import load_dataset

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    data = load_dataset(task.hub_dataset, task.hub_config, **kwargs)
    splits = {"train": _examples_from_hub(task, data["train"], f"{task.hub_dataset}/{task.hub_config}/train")}
    for local, hub in zip(task.dev_splits, task.hub_dev_splits):
        splits[local] = _examples_from_hub(task, data[hub], f"{task.hub_dataset}/{task.hub_config}/{hub}")
    return splits


def _examples_from_hub(task: ClassificationTask, split, source: str) -> Examples:
    columns = task.hub_text_columns
    labels = [float(v) for v in split["label"]] if task.is_regression else [int(v) for v in split["label"]]
    if not task.is_regression and any(not 0 <= v < task.num_labels for v in labels):
        raise DataError(f"{source}: labels outside 0..{task.num_labels - 1} (unlabelled test split?)")
    return Examples(
        list(split[columns[0]]), list(split[columns[1]]) if len(columns) > 1 else None, labels, source
    )
