"""Zero-shot cross-lingual transfer (Aghajanyan et al. 2021, Table 3): fine-tune on
English NLI (MNLI), evaluate the same model, with no further training, on NLI data in
other languages, and report accuracy per language and the average.

Local XNLI-style files come in several layouts; ``read_language_file`` recognises them
from their header (case-insensitive; a column mapping, ``--eval-columns``, overrides):
- ``sentence1_<lang>``/``sentence2_<lang>`` columns (myXNLI: ``genre label sentence1_sw ...``);
- ``premise``/``hypo`` (C-XNLI CSV), ``premise``/``hypothesis`` (XNLIvar TSV, the GLUE
  diagnostic's ``Premise``/``Hypothesis``) or ``sentence1``/``sentence2`` (GLUE MNLI);
- a ``label`` or ``gold_label`` column;
- no header, three columns ``premise hypothesis label`` (XGLUE German ``.txt``), told
  apart from a header by the third field being a label.
Labels are the strings entailment/neutral/contradiction, or the ids 0/1/2 in that order
(the XNLI and MNLI convention on the hub); ``label_map`` overrides.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from rxf.errors import DataError, OptionError
from rxf.finetune import FinetuneSpec, run_finetune
from rxf.jsonio import write_json_atomic
from rxf.methods.options import MethodOptions
from rxf.tasks.generic import find_column, label_ids, texts
from rxf.tasks.glue import get_task
from rxf.tasks.loading import Examples, parse_column_map, read_records

NLI_LABELS = ("entailment", "neutral", "contradiction")
HUB_IDS = {str(i): name for i, name in enumerate(NLI_LABELS)}
COLUMN_KEYS = ("premise", "hypothesis", "label")
_LABEL_COLUMNS = ("label", "gold_label")


def _text_pairs(language: str) -> tuple[tuple[str, str], ...]:
    return ((f"sentence1_{language}", f"sentence2_{language}"), ("premise", "hypothesis"), ("premise", "hypo"),
            ("sentence1", "sentence2"))


def recognise_columns(header: list[str], language: str) -> dict[str, str]:
    """The premise, hypothesis and label columns found in ``header`` (those found)."""
    found = {}
    for first, second in _text_pairs(language):
        pair = find_column(header, first), find_column(header, second)
        if all(pair):
            found = {"premise": pair[0], "hypothesis": pair[1]}
            break
    label = next((column for name in _LABEL_COLUMNS if (column := find_column(header, name))), None)
    return found | ({"label": label} if label else {})


def _unrecognised(path: Path, language: str, header: list[str], found: dict[str, str]) -> DataError:
    """What the file has, what was looked for, and how to say it."""
    hint = (f"map them with --eval-columns {language}:premise=COL,hypothesis=COL,label=COL "
            "(names, or 0-based positions for a file without a header)")
    if set(found) == {"premise", "hypothesis"}:
        return DataError(f"{path}:1: no label column (label or gold_label) among its columns {', '.join(header)} "
                         f"(an unlabelled test file?); {hint}")
    return DataError(
        f"{path}:1: cannot tell the premise, hypothesis and label columns of this {language} file: its first line "
        f"is {', '.join(header)}; looked for sentence1_{language}/sentence2_{language}, premise/hypothesis (or hypo) "
        f"or sentence1/sentence2, and label or gold_label, or three columns premise, hypothesis, label without a "
        f"header; {hint}")


def read_language_file(
    path: str | Path, language: str, columns: dict[str, str] | None = None, label_map: dict[str, str] | None = None
) -> Examples:
    """One language's evaluation file as ``Examples`` with MNLI's label ids. ``columns``
    maps premise/hypothesis/label to the file's columns (all positions: a file without
    a header); keys it leaves out are recognised from the header."""
    path, columns = Path(path), dict(columns or {})
    positional = bool(columns) and all(value.isdigit() for value in columns.values())
    rows = read_records(path, header=not positional)
    if positional:
        mapping = columns
    else:
        header = list(rows[0][1])
        for key, column in columns.items():
            if column not in header:
                raise DataError(f"{path}:1: no column {column!r} (--eval-columns {key}={column}); the file has "
                                f"{', '.join(header)}")
        mapping = recognise_columns(header, language) | columns
        if not mapping and len(header) == 3 and _is_label(header[2], label_map):
            rows, mapping = read_records(path, header=False), {"premise": "0", "hypothesis": "1", "label": "2"}
        elif set(mapping) != set(COLUMN_KEYS):
            raise _unrecognised(path, language, header, mapping)
    first, second = texts(path, rows, (mapping["premise"], mapping["hypothesis"]))
    labels = label_ids(path, rows, mapping["label"], _label_ids(label_map),
                       "NLI labels and their MNLI ids")
    return Examples(first, second, labels, f"{path} ({language})")


def _label_ids(label_map: dict[str, str] | None) -> dict[str, int]:
    """Label text -> MNLI id: the NLI labels, and what ``label_map`` (default: the hub's
    ids 0/1/2) renames to them."""
    ids = {name: i for i, name in enumerate(NLI_LABELS)}
    for text, name in (label_map or HUB_IDS).items():
        if name in NLI_LABELS:
            ids[text] = NLI_LABELS.index(name)
    return ids


def _is_label(value: str, label_map: dict[str, str] | None) -> bool:
    return value.strip() in _label_ids(label_map)


def parse_eval_columns(items: list[str], languages) -> dict[str, dict[str, str]]:
    """``["de:premise=p,hypothesis=h,label=l", "label=gold"]`` -> {"de": {...}, "": {...}}
    (the key "" applies to every language without its own mapping)."""
    mappings = {}
    for item in items:
        head, colon, rest = item.partition(":")
        language, text = (head.strip(), rest) if colon and "=" not in head else ("", item)
        if language and language not in languages:
            raise OptionError(f"--eval-columns: no --eval file for language {language!r}")
        mappings[language] = parse_column_map(text, "--eval-columns", valid_keys=COLUMN_KEYS)
    return mappings


def evaluate_accuracy(model, tokenizer, examples: Examples, max_length: int = 128, batch_size: int = 64) -> float:
    """Accuracy of a sequence classifier on (N,) examples, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            stop = start + batch_size
            pairs = (examples.text_a[start:stop], examples.text_b[start:stop]) if examples.text_b else (examples.text_a[start:stop],)
            encoded = tokenizer(*pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            predicted = model(**encoded).logits.argmax(-1).cpu().numpy()
            correct += int((predicted == np.asarray(examples.labels[start:stop])).sum())
    return correct / len(examples)


def parse_language_specs(specs: list[str]) -> dict[str, Path]:
    """``["de=path/dev.txt", "sw=path/sw.tsv"]`` -> {"de": Path, "sw": Path}."""
    languages = {}
    for spec in specs:
        if "=" not in spec:
            raise OptionError(f"--eval: expected LANG=PATH, got {spec!r}")
        language, path = spec.split("=", 1)
        languages[language.strip()] = Path(path.strip())
    if not languages:
        raise OptionError("--eval: give at least one LANG=PATH")
    return languages


def run_xnli(
    out: Path, methods: list[str], base: FinetuneSpec, options: MethodOptions, languages: dict[str, Path],
    max_eval_samples: int | None = None, columns: dict[str, dict[str, str]] | None = None,
) -> dict:
    """Fine-tune on English MNLI with each method (``base`` says where the data lies),
    then evaluate zero-shot on every language; writes xnli.json and xnli.md in ``out``.
    ``columns``: per language (key "" for all) the mapping of its file's columns."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if get_task(base.task).labels != NLI_LABELS:
        raise OptionError(f"--task: XNLI transfer trains on an NLI task with labels {NLI_LABELS}")
    columns = columns or {}
    evaluation = {lang: read_language_file(path, lang, columns.get(lang, columns.get(""))).head(max_eval_samples)
                  for lang, path in languages.items()}
    rows = {}
    for method in methods:
        spec = dataclasses.replace(base, output_dir=str(Path(out) / "runs" / method))
        results = run_finetune(spec, dataclasses.replace(options, method=method))
        best = Path(spec.output_dir) / "best"
        model = AutoModelForSequenceClassification.from_pretrained(best)
        tokenizer = AutoTokenizer.from_pretrained(best)
        accuracy = {lang: evaluate_accuracy(model, tokenizer, ex, spec.max_length) for lang, ex in evaluation.items()}
        rows[method] = {
            "english_dev": results["best"], "accuracy": accuracy,
            "average": float(np.mean(list(accuracy.values()))), "seed": spec.seed,
        }
    report = {"languages": {lang: {"source": ex.source, "examples": len(ex)} for lang, ex in evaluation.items()},
              "methods": rows}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(out) / "xnli.json", report)
    (Path(out) / "xnli.md").write_text(xnli_table(report))
    return report


def xnli_table(report: dict) -> str:
    """Accuracy ×100 per language and the average, one row per method (Table 3's layout)."""
    languages = list(report["languages"])
    lines = ["| method | " + " | ".join(languages) + " | avg |", "|---|" + "---|" * (len(languages) + 1)]
    for method, row in report["methods"].items():
        cells = [f"{100 * row['accuracy'][lang]:.1f}" for lang in languages]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * row['average']:.1f} |")
    return "\n".join(lines) + "\n"
