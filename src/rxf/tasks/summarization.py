"""Summarisation tasks (Aghajanyan et al. 2021, Table 4): CNN/DailyMail, Gigaword, XSum,
Reddit TIFU — from the hub, or locally as ``.source``/``.target`` line pairs, CSV or
JSONL with a column mapping — and ROUGE as papers report it.

ROUGE-1/2/L/Lsum F-measures from the ``rouge-score`` package with Porter stemming, ×100.
ROUGE-Lsum is computed on text split into one sentence per line (a split after ``.``,
``!`` or ``?`` followed by white space), as the package expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rxf.errors import DataError, OptionError
from rxf.tasks.loading import read_records


@dataclass(frozen=True)
class SummarizationTask:
    name: str
    hub_dataset: str
    hub_config: str | None
    text_column: str
    summary_column: str
    hub_dev_split: str = "validation"


SUMMARIZATION_TASKS = {
    t.name: t
    for t in (
        SummarizationTask("cnn_dailymail", "abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
        SummarizationTask("gigaword", "Harvard/gigaword", None, "document", "summary"),
        SummarizationTask("xsum", "EdinburghNLP/xsum", None, "document", "summary"),
        SummarizationTask("reddit_tifu", "ctr4si/reddit_tifu", "long", "documents", "tldr", hub_dev_split="train"),
    )
}


@dataclass
class Pairs:
    """(N,) source documents and (N,) reference summaries."""

    sources: list[str]
    targets: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.sources)

    def head(self, n: int | None) -> "Pairs":
        return self if n is None or n >= len(self) else Pairs(self.sources[:n], self.targets[:n], self.source)


_SPLIT_NAMES = {"train": ("train",), "dev": ("val", "validation", "dev")}


def _line_pairs(source: Path) -> Pairs:
    target = source.with_suffix(".target")
    if not target.is_file():
        raise DataError(f"{target}: file not found (the pair of {source})")
    sources = source.read_text(encoding="utf-8").splitlines()
    targets = target.read_text(encoding="utf-8").splitlines()
    if not sources:
        raise DataError(f"{source}: empty file")
    if len(sources) != len(targets):
        raise DataError(f"{source} has {len(sources)} lines but {target} has {len(targets)}: they must pair up")
    return Pairs(sources, targets, str(source))


def _table_pairs(task: SummarizationTask, path: Path, columns: dict[str, str]) -> Pairs:
    rows = read_records(path)
    text, summary = columns.get("text", task.text_column), columns.get("summary", task.summary_column)
    present = set(rows[0][1])
    for column in (text, summary):
        if column not in present:
            raise DataError(f"{path}:{rows[0][0]}: missing column {column!r}; the file has {', '.join(sorted(present))}; "
                            f"map them with --columns text=COLUMN,summary=COLUMN")
    return Pairs([str(r[text]) for _, r in rows], [str(r[summary]) for _, r in rows], str(path))


def find_pairs(task: SummarizationTask, data_dir: Path, split: str, columns: dict[str, str]) -> Pairs | None:
    for name in _SPLIT_NAMES[split]:
        for folder in (Path(data_dir) / name, Path(data_dir)):
            if (folder / f"{name}.source").is_file():
                return _line_pairs(folder / f"{name}.source")
            for suffix in (".jsonl", ".csv", ".tsv"):
                if (folder / f"{name}{suffix}").is_file():
                    return _table_pairs(task, folder / f"{name}{suffix}", columns)
    return None


def load_summarization(task: SummarizationTask, data_dir: str | None, columns: dict[str, str] | None = None,
                       train_file: str | None = None, dev_file: str | None = None,
                       trust_remote_code: bool = False) -> dict[str, Pairs]:
    """{"train": Pairs, "dev": Pairs} from local files or the hub."""
    columns = columns or {}
    if data_dir is None and train_file is None:
        from datasets import load_dataset

        kwargs = {"trust_remote_code": True} if trust_remote_code else {}
        data = load_dataset(task.hub_dataset, task.hub_config, **kwargs)
        return {
            split: Pairs(list(data[hub][task.text_column]), list(data[hub][task.summary_column]),
                         f"{task.hub_dataset}/{hub}")
            for split, hub in (("train", "train"), ("dev", task.hub_dev_split))
        }
    splits = {}
    for split, explicit in (("train", train_file), ("dev", dev_file)):
        if explicit:
            path = Path(explicit)
            splits[split] = _line_pairs(path) if path.suffix == ".source" else _table_pairs(task, path, columns)
            continue
        found = find_pairs(task, Path(data_dir or "."), split, columns)
        if found is None:
            names = ", ".join(f"{n}/{n}.source, {n}.jsonl, {n}.csv" for n in _SPLIT_NAMES[split])
            raise DataError(f"no {split} split for {task.name} in {data_dir}: looked for {names}")
        splits[split] = found
    return splits


def get_summarization_task(name: str) -> SummarizationTask:
    try:
        return SUMMARIZATION_TASKS[name]
    except KeyError:
        raise OptionError(f"--task: unknown summarisation task {name!r}") from None


def split_sentences(text: str) -> str:
    """One sentence per line, for ROUGE-Lsum."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures ×100 with stemming."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100 * value / max(len(predictions), 1) for key, value in totals.items()}
