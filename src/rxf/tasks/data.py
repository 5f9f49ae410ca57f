"""A run's task and its data splits: a GLUE task (local files or the hub) or a task that
``--task classification|regression`` defines from the user's files, truncated to the
requested sizes. Used by fine-tuning, probing and the experiments alike."""

from __future__ import annotations

from pathlib import Path

from rxf.errors import OptionError
from rxf.spec import FinetuneSpec
from rxf.tasks.glue import ClassificationTask, get_task
from rxf.tasks.loading import Examples, load_hub, load_local, parse_column_map


def load_task_data(spec: FinetuneSpec, task: ClassificationTask | None = None) -> dict[str, Examples]:
    """The train and dev splits, truncated to the requested sizes."""
    return task_and_data(spec, task)[1]


def task_and_data(spec: FinetuneSpec, task: ClassificationTask | None = None
                  ) -> tuple[ClassificationTask, dict[str, Examples]]:
    """The task (``task``, else the GLUE task ``spec.task``, else the one that
    ``--task classification|regression`` defines from its files) and its splits,
    truncated to the requested sizes."""
    from rxf.tasks.generic import is_generic, load_generic

    if task is None and is_generic(spec.task):
        task, splits = load_generic(spec)
    else:
        task = task or get_task(spec.task)
        splits = _local_or_hub_splits(spec, task)
    return task, {
        name: examples.head(spec.max_train_samples if name == "train" else spec.max_eval_samples)
        for name, examples in splits.items()
    }


def _local_or_hub_splits(spec: FinetuneSpec, task: ClassificationTask) -> dict[str, Examples]:
    if spec.data_dir is None and spec.train_file is None:
        return load_hub(task, spec.trust_remote_code)
    if spec.data_dir is not None and not Path(spec.data_dir).is_dir():
        raise OptionError(f"--data-dir: {spec.data_dir} is not a folder")
    return load_local(task, Path(spec.data_dir or "."), parse_column_map(spec.columns), spec.train_file, spec.dev_file)
