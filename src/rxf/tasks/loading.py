"""Task data from local files (official GLUE TSVs, CSV, JSONL) or the Hugging Face hub,
checked row by row, into a plain ``Examples`` structure.

Local layout: ``--data-dir`` is either the GLUE root (holding ``SST-2/``, ``RTE/``, ...)
or a folder holding the split files itself (``train.tsv``, ``dev.jsonl``, ...). Official
GLUE TSVs are read as tab-separated text with quoting off (quotes are part of the text),
a UTF-8 byte-order mark is dropped (MRPC) and CoLA's headerless files get their column
names. Files with other column names are read through a column mapping; the common
``text_a``/``text_b``/``label`` layout (LM-BFF k-shot, ``glue_pretrain`` JSONL) is
recognised without one. Any of these files may be gzip-compressed if its name ends in
``.gz`` (``train.tsv.gz``). Every problem is reported with the file and line.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from rxf.errors import DataError
from rxf.tasks.glue import ClassificationTask

SUFFIXES = (".tsv", ".jsonl", ".csv")
_GENERIC_COLUMNS = ("text_a", "text_b", "label")
_GZIP_MAGIC = b"\x1f\x8b"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


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


def read_records(
    path: Path, headerless_columns: tuple[str, ...] | None = None, header: bool = True
) -> list[tuple[int, dict]]:
    """Rows of a .tsv, .csv or .jsonl file (or the same gzipped, ``.tsv.gz``) as
    (line number, {column: value}). ``header=False``: a .tsv or .csv file without a
    header row, whose columns are named by their 0-based position ("0", "1", ...)."""
    path = Path(path)
    fmt, text = _check_format(path), read_text(path)
    if not header and headerless_columns is None:
        headerless_columns = positional_columns(path, fmt, text)
    return _records(path, fmt, text, headerless_columns)


def positional_columns(path: Path, fmt: str, text: str) -> tuple[str, ...]:
    """("0", ..., "n-1") for a headerless file whose first row has n fields."""
    if fmt == ".jsonl":
        raise DataError(f"{path}: JSONL rows name their fields; files without a header row (--no-header, "
                        "column positions) are .tsv or .csv")
    if fmt == ".csv":
        first = next((row for row in csv.reader(io.StringIO(text, newline="")) if row), [])
    else:
        first = next((line for line in text.split("\n") if line.strip()), "").rstrip("\r").split("\t")
    return tuple(str(i) for i in range(len(first)))


def table_format(path: Path) -> str:
    """The table format a file name says, ignoring a final ``.gz``: ``.tsv`` for both
    ``train.tsv`` and ``train.tsv.gz``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _check_format(path: Path) -> str:
    """The file's table format; a missing, empty or unsupported file is a DataError
    (checked before reading, so that e.g. a .parquet file is named as such)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    fmt = table_format(path)
    if fmt not in (".jsonl", ".csv", ".tsv", ".txt"):
        shown = repr(fmt) if fmt else "(none)"
        raise DataError(f"{path}: unsupported file type {shown} (use .tsv, .csv or .jsonl, optionally gzipped as .gz)")
    return fmt


def read_text(path: Path) -> str:
    """The content of a UTF-8 text file, decompressed if its name ends in ``.gz``, with
    a byte-order mark dropped. Content that is not UTF-8 text (a gzip file under a plain
    name, UTF-16, NUL bytes, invalid bytes) is a one-line DataError: the csv and json
    readers would otherwise fail with a traceback, or read binary garbage as text."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: cannot decompress it as gzip ({exc})") from None
        if not data:
            raise DataError(f"{path}: empty file (after decompression)")
    elif data[:2] == _GZIP_MAGIC:
        raise DataError(f"{path}: the file is gzip-compressed; name it {path.name}.gz to have it decompressed")
    if data[:2] in _UTF16_BOMS:
        raise DataError(f"{path}: the file is UTF-16 text; save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}:{_line_at(data, nul)}: binary content (a NUL byte), not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{_line_at(data, exc.start)}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None


def _line_at(data: bytes, offset: int) -> int:
    """The 1-based line number of byte ``offset``."""
    return data.count(b"\n", 0, offset) + 1


def _records(path: Path, fmt: str, text: str, headerless_columns) -> list[tuple[int, dict]]:
    if fmt == ".jsonl":
        rows = _read_jsonl(path, text)
    elif fmt == ".csv":
        rows = _read_csv(path, text, headerless_columns)
    else:
        rows = _read_tsv(path, text, headerless_columns)
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def _read_tsv(path: Path, text: str, headerless_columns) -> list[tuple[int, dict]]:
    rows = []
    lines = text.split("\n")
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


def _read_csv(path: Path, text: str, headerless_columns=None) -> list[tuple[int, dict]]:
    rows = []
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": quoted fields may hold line breaks
    header = list(headerless_columns) if headerless_columns is not None else next(reader, None)
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(header):
            raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(fields)}")
        rows.append((reader.line_num, dict(zip(header, fields))))
    return rows


def _read_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
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


def parse_column_map(
    spec: str | None, option: str = "--columns", valid_keys: tuple[str, ...] | list[str] | None = None
) -> dict[str, str]:
    """``"sentence1=text_a,label=gold"`` -> {"sentence1": "text_a", "label": "gold"}.

    With ``valid_keys``, a key that is not one of them is refused (see ``check_column_keys``)."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        if "=" not in item:
            raise DataError(f"{option}: expected KEY=VALUE items separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        mapping[key.strip()] = value.strip()
    if valid_keys is not None:
        check_column_keys(mapping, valid_keys, option)
    return mapping


def column_keys(task: ClassificationTask) -> list[str]:
    """The keys a column mapping for ``task`` may have: its text columns and label column."""
    return list(task.text_columns) + [task.label_column]


def check_column_keys(mapping: dict[str, str], valid_keys, option: str = "--columns", owner: str = "") -> None:
    """Refuse a mapping key that is not one of ``valid_keys``: a misspelt key would
    otherwise be ignored and the run would read the wrong (or the default) column."""
    valid_keys = list(valid_keys)
    unknown = [key for key in mapping if key not in valid_keys]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], valid_keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    owner = f" for {owner}" if owner else ""
    raise DataError(f"{option}: unknown key {unknown[0]!r}{hint}; the valid keys{owner} are {', '.join(valid_keys)}")


def examples_from_file(
    task: ClassificationTask,
    path: Path,
    column_map: dict[str, str] | None = None,
    label_map: dict[str, str] | None = None,
) -> Examples:
    """Read one split file of ``task`` and check every row's label. ``column_map`` maps
    the task's column names (its text columns and label column) to the file's; other
    keys are refused. ``label_map`` renames the file's labels to the task's (e.g.
    {"0": "entailment"}) before they are checked."""
    wanted = column_keys(task)
    check_column_keys(column_map or {}, wanted, owner=task.name)
    path = Path(path)
    fmt = _check_format(path)
    text = read_text(path)
    headerless = task.headerless_columns if fmt in (".tsv", ".txt") and _lacks_header(text, task) else None
    rows = _records(path, fmt, text, headerless)
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


def _lacks_header(text: str, task: ClassificationTask) -> bool:
    """CoLA's official files have no header row: its first line starts with a source id."""
    if task.headerless_columns is None:
        return False
    first = text.split("\n", 1)[0].rstrip("\r").split("\t")
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


def _file_names(split: str) -> list[str]:
    """The file names a split may have, plain before gzipped: train.tsv, train.tsv.gz, ..."""
    return [f"{split}{suffix}{gz}" for suffix in SUFFIXES for gz in ("", ".gz")]


def find_split_file(task: ClassificationTask, data_dir: Path, split: str) -> Path | None:
    """``data_dir/<TaskFolder>/<split>.{tsv,jsonl,csv}[.gz]`` or ``data_dir/<split>.*``."""
    for folder in (Path(data_dir) / task.folder, Path(data_dir)):
        for name in _file_names(split):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _missing_split(task: ClassificationTask, data_dir: Path, split: str) -> DataError:
    folder = Path(data_dir) / task.folder
    folder = folder if folder.is_dir() else Path(data_dir)
    looked = ", ".join(f"{split}{s}" for s in SUFFIXES) + " (or the same .gz)"
    hints = sorted({
        str(p.parent.relative_to(folder)) for name in _file_names(split) for p in folder.glob(f"**/{name}")
        if p.parent != folder
    }) if folder.is_dir() else []
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
    # A wrong --columns key is wrong whatever the folder holds: report it first.
    check_column_keys(column_map or {}, column_keys(task), owner=task.name)
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
    network, or a populated datasets cache). Labels are the hub's ids already.

    Without network (or in offline mode, with nothing cached) this is a one-line
    DataError pointing at the local-file options, not datasets' retries and traceback."""
    from datasets import load_dataset

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        data = load_dataset(task.hub_dataset, task.hub_config, **kwargs)
    except _network_errors() as exc:
        raise DataError(_hub_unreachable(task, exc)) from None
    splits = {"train": _examples_from_hub(task, data["train"], f"{task.hub_dataset}/{task.hub_config}/train")}
    for local, hub in zip(task.dev_splits, task.hub_dev_splits):
        splits[local] = _examples_from_hub(task, data[hub], f"{task.hub_dataset}/{task.hub_config}/{hub}")
    return splits


def _hub_unreachable(task: ClassificationTask, exc: BaseException) -> str:
    from datasets import config

    name = f"{task.hub_dataset} ({task.hub_config})" if task.hub_config else task.hub_dataset
    # datasets reads HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import: ask it, not os.environ.
    if getattr(config, "HF_HUB_OFFLINE", False) or getattr(config, "HF_DATASETS_OFFLINE", False):
        why = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the datasets cache"
    else:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = f"the Hugging Face hub is unreachable ({detail})"
    return f"hub dataset {name}: {why}; pass --data-dir (or --train-file and --dev-file) with local files"


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "no network": the builtin ones, which datasets raises
    itself (its offline error is a ConnectionError), and those of the HTTP client below
    it, which leak through on some code paths (httpx or requests, by version)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub.utils import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def _examples_from_hub(task: ClassificationTask, split, source: str) -> Examples:
    columns = task.hub_text_columns
    labels = [float(v) for v in split["label"]] if task.is_regression else [int(v) for v in split["label"]]
    if not task.is_regression and any(not 0 <= v < task.num_labels for v in labels):
        raise DataError(f"{source}: labels outside 0..{task.num_labels - 1} (unlabelled test split?)")
    return Examples(
        list(split[columns[0]]), list(split[columns[1]]) if len(columns) > 1 else None, labels, source
    )
