"""Tasks: definitions, metrics and data loading."""

from rxf.tasks.glue import GLUE_TASKS, ClassificationTask, compute_metric, get_task
from rxf.tasks.loading import Examples, load_hub, load_local

__all__ = ["GLUE_TASKS", "ClassificationTask", "Examples", "compute_metric", "get_task", "load_hub", "load_local"]
