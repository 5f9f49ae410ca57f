"""Linear probes on frozen encoders (Aghajanyan et al. 2021, Section 4.1, Figure 3).

For each checkpoint and task: the encoder's sentence representations of the task's
training and dev examples (``rxf.probing.features``, cached), a linear layer trained on
the training representations only — logistic regression for classification, ridge for
regression, on standardised features, seeded — and its dev metric beside its training
metric and the majority-class baseline. The probe's regularisation is chosen by 5-fold
cross-validation on the training features, scored by the task's own metric, as probing
studies do: a fixed C = 1 on 2,000 standardised 384-wide features over-fits, and MRPC
probes of every encoder, the pre-trained one included, then scored below the majority
class. With a reference model, per-layer linear CKA and effective rank
(``rxf.probing.drift``) are reported beside the probes.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rxf.errors import OptionError
from rxf.models import check_model_folder
from rxf.spec import FinetuneSpec
from rxf.tasks.data import load_task_data
from rxf.probing.drift import layer_drift
from rxf.probing.features import cached_features, encode, load_encoder
from rxf.probing.report import group_scores, write_probe_report
from rxf.tasks.glue import ClassificationTask, get_task
from rxf.tasks.loading import Examples


# Inverse regularisation strengths (logistic) and penalties (ridge) tried by the cross-validation.
C_GRID = np.logspace(-4, 2, 7)
ALPHA_GRID = np.logspace(-2, 5, 8)


def train_linear_probe(features: np.ndarray, labels, task: ClassificationTask, seed: int = 0) -> GridSearchCV:
    """A linear layer (after standardisation) fitted on (N, H) features; only it learns.
    Its regularisation is chosen by 5-fold cross-validation on these features (the scaler
    fitted inside each fold), scored by the task's main metric (Matthews correlation for
    CoLA, Pearson for STS-B, ...), then refitted on all of them. ``probe.best_estimator_``
    is the (scaler, linear layer) pipeline."""
    def score(references, predicted):
        return task.compute_metrics(predicted, references)[task.main_metric]

    if task.is_regression:
        head, grid, folds = Ridge(), {"ridge__alpha": ALPHA_GRID}, KFold(5, shuffle=True, random_state=seed)
    else:
        head = LogisticRegression(max_iter=3000, random_state=seed)
        grid, folds = {"logisticregression__C": C_GRID}, StratifiedKFold(5, shuffle=True, random_state=seed)
    # The 35 logistic fits (lbfgs, single-threaded) take minutes on a fine-tuned encoder's
    # features: spread over the cores this process may use (a --jobs worker's share). The
    # result does not depend on it; the ridge fits take seconds, and stay here.
    workers = None if task.is_regression else max(1, torch.get_num_threads())
    search = GridSearchCV(make_pipeline(StandardScaler(), head), grid, cv=folds, scoring=make_scorer(score),
                          n_jobs=workers)
    with warnings.catch_warnings():
        # The smallest ridge penalties meet near-collinear features: scipy warns once per
        # fold and grid point (hundreds of lines per probe run); the cross-validation
        # scores those fits like any other and rarely picks them.
        warnings.simplefilter("ignore", LinAlgWarning)
        return search.fit(features, np.asarray(labels))


def chosen_regularisation(probe: GridSearchCV) -> dict:
    return {name.split("__")[1]: float(value) for name, value in probe.best_params_.items()}


def majority_baseline(task: ClassificationTask, train: Examples, dev: Examples) -> float | None:
    if task.is_regression:
        return None
    majority = Counter(train.labels).most_common(1)[0][0]
    return task.compute_metrics(np.full(len(dev), majority), np.asarray(dev.labels))[task.main_metric]


def probe_checkpoint(
    checkpoint: str, task: ClassificationTask, splits: dict[str, Examples], seed: int = 0,
    max_length: int = 128, pooling: str = "cls", encoder_and_tokenizer=None,
) -> dict:
    """Probe one task with one frozen checkpoint; returns the dev metrics."""
    dev_name = next(name for name in splits if name != "train")
    train_x, cached_train = cached_features(checkpoint, splits["train"], max_length, pooling, encoder_and_tokenizer)
    dev_x, cached_dev = cached_features(checkpoint, splits[dev_name], max_length, pooling, encoder_and_tokenizer)
    probe = train_linear_probe(train_x, splits["train"].labels, task, seed)
    metrics = task.compute_metrics(probe.predict(dev_x), np.asarray(splits[dev_name].labels))
    train_metrics = task.compute_metrics(probe.predict(train_x), np.asarray(splits["train"].labels))
    return {
        "task": task.name, "metrics": metrics, "main_metric": task.main_metric, "score": metrics[task.main_metric],
        "train_score": train_metrics[task.main_metric], "regularisation": chosen_regularisation(probe),
        "majority": majority_baseline(task, splits["train"], splits[dev_name]),
        "train_examples": len(splits["train"]), "dev_examples": len(splits[dev_name]),
        "features_cached": cached_train and cached_dev,
    }


def task_splits(task: str, base: FinetuneSpec, task_data: dict[str, str] | None = None) -> dict[str, Examples]:
    """A task's splits, from ``task_data[task]`` when given, else from ``base.data_dir``."""
    folder = (task_data or {}).get(task, base.data_dir)
    return load_task_data(dataclasses.replace(base, task=task, data_dir=folder))


def run_probe(
    out: Path, checkpoints: dict[str, str], tasks: list[str], base: FinetuneSpec,
    task_data: dict[str, str] | None = None, reference: str | None = None, cka_samples: int = 256,
    pooling: str = "cls",
) -> dict:
    """Probe every task with every checkpoint; write probe.json, probe.md, probe.png
    (and cka.png with a reference) in ``out``."""
    data = {task: task_splits(task, base, task_data) for task in tasks}  # every file checked first
    for checkpoint in checkpoints.values():  # and every local model folder, before an hour of probing
        if not Path(checkpoint).is_dir() and (checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1):
            raise OptionError(f"--checkpoint: {checkpoint} is not a folder")
        check_model_folder("--checkpoint", checkpoint)
    results: dict = {}
    for name, checkpoint in checkpoints.items():
        loaded = load_encoder(checkpoint, base.trust_remote_code)
        results[name] = {task: probe_checkpoint(checkpoint, get_task(task), data[task], base.seed, base.max_length,
                                                pooling, loaded) for task in tasks}
    # What makes two probe reports comparable (scripts/merge_probes.py checks it).
    settings = {"max_length": base.max_length, "pooling": pooling, "seed": base.seed,
                "max_train_samples": base.max_train_samples, "max_eval_samples": base.max_eval_samples,
                "cka_samples": cka_samples}
    report = {"checkpoints": checkpoints, "tasks": tasks, "settings": settings, "probes": results,
              "groups": group_scores(results, tasks)}
    if reference is not None:
        report["drift"] = drift_report(reference, checkpoints, data[tasks[0]], base, cka_samples)
    write_probe_report(out, report)
    return report


def checkpoints_from_runs(folder: str | Path) -> dict[str, str]:
    """``{"<method>/seed<N>": best/}`` for every finished run below ``folder`` (an
    ``rxf compare`` output), in a stable order."""
    found = {}
    for path in sorted(Path(folder).rglob("results.json")):
        best = path.parent / "best"
        if best.is_dir():
            results = json.loads(path.read_text())
            found[f"{results['method']}/seed{results['seed']}"] = str(best)
    return found


def drift_report(reference: str, checkpoints: dict[str, str], splits: dict[str, Examples], base: FinetuneSpec,
                 samples: int) -> dict:
    """Per-layer CKA and effective rank of each checkpoint against ``reference``, on the
    first ``samples`` dev examples of the first task (mean-pooled hidden states)."""
    dev = next(ex for name, ex in splits.items() if name != "train").head(samples)
    ref_tokenizer, ref_encoder = load_encoder(reference, base.trust_remote_code)
    layers = list(range(ref_encoder.config.num_hidden_layers + 1))
    ref_states = encode(ref_encoder, ref_tokenizer, dev, base.max_length, "mean", layers)
    drift = {"reference": reference, "examples": len(dev), "checkpoints": {}}
    for name, checkpoint in checkpoints.items():
        tokenizer, encoder = load_encoder(checkpoint, base.trust_remote_code)
        states = encode(encoder, tokenizer, dev, base.max_length, "mean", layers)
        drift["checkpoints"][name] = layer_drift(ref_states, states)
    return drift
