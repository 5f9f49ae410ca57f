"""Zero-shot cross-lingual transfer (Aghajanyan et al. 2021, Table 3): fine-tune on
English NLI (MNLI), evaluate the same model, with no further training, on NLI data in
other languages, and report accuracy per language and the average.

Local XNLI-style files come in several layouts; ``read_language_file`` recognises them
from their header (a column mapping overrides):
- ``sentence1_<lang>``/``sentence2_<lang>`` columns (myXNLI: ``genre label sentence1_sw ...``);
- ``premise``/``hypo`` (C-XNLI CSV) or ``premise``/``hypothesis`` (XNLIvar TSV);
- no header, three columns ``premise hypothesis label`` (XGLUE German ``.txt``).
Labels are the strings entailment/neutral/contradiction, or the ids 0/1/2 in that order
(the XNLI and MNLI convention on the hub); ``label_map`` overrides.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch

from rxf.errors import DataError, OptionError
from rxf.finetune import FinetuneSpec, run_finetune
from rxf.jsonio import write_json_atomic
from rxf.methods.options import MethodOptions
from rxf.tasks.glue import ClassificationTask, get_task
from rxf.tasks.loading import Examples, examples_from_file

NLI_LABELS = ("entailment", "neutral", "contradiction")
XNLI_TASK = ClassificationTask(
    name="xnli", folder="", text_columns=("premise", "hypothesis"), label_column="label", labels=NLI_LABELS,
    metric="accuracy", headerless_columns=("premise", "hypothesis", "label"),
)
HUB_IDS = {str(i): name for i, name in enumerate(NLI_LABELS)}


def _header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            return next(csv.reader(f), [])
        return f.readline().rstrip("\r\n").split("\t")


def read_language_file(
    path: str | Path, language: str, columns: dict[str, str] | None = None, label_map: dict[str, str] | None = None
) -> Examples:
    """One language's evaluation file as ``Examples`` with MNLI's label ids."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    header = _header(path)
    task, mapping = dataclasses.replace(XNLI_TASK, headerless_columns=None), dict(columns or {})
    if not mapping:
        if f"sentence1_{language}" in header:
            mapping = {"premise": f"sentence1_{language}", "hypothesis": f"sentence2_{language}"}
        elif "premise" in header and "hypo" in header and "hypothesis" not in header:
            mapping = {"hypothesis": "hypo"}
        elif not {"premise", "hypothesis"} <= set(header):
            if len(header) != 3:
                raise DataError(f"{path}:1: cannot tell its columns (header {header}); pass a column mapping")
            task = XNLI_TASK  # headerless premise, hypothesis, label
    examples = examples_from_file(task, path, mapping, label_map=label_map or HUB_IDS)
    examples.source = f"{path} ({language})"
    return examples


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
    max_eval_samples: int | None = None,
) -> dict:
    """Fine-tune on English MNLI with each method (``base`` says where the data lies),
    then evaluate zero-shot on every language; writes xnli.json and xnli.md in ``out``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if get_task(base.task).labels != NLI_LABELS:
        raise OptionError(f"--task: XNLI transfer trains on an NLI task with labels {NLI_LABELS}")
    evaluation = {lang: read_language_file(path, lang).head(max_eval_samples) for lang, path in languages.items()}
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
