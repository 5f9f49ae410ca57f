"""Several runs at once on one machine, the cores divided between them (``--jobs N``).

A small model keeps two cores busier as two single-thread processes than as one
two-thread process (its matrices are too small for two threads to split well; see
docs/performance.md), so ``rxf compare``, ``chain`` and ``sweep`` can run N jobs at once,
each in a process of its own with ``cores // N`` threads. Processes are started with
``spawn`` (a fresh interpreter: no torch state shared with the parent) and every job's
exception reaches the caller.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, Callable, Iterable


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _start_job(threads: int) -> None:
    """In each job's process: its share of the cores, and the command's quiet output."""
    import torch

    from rxf.console import quiet_libraries

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for any library that reads it later
    quiet_libraries()


def run_jobs(function: Callable, calls: Iterable[tuple], jobs: int = 1) -> list[Any]:
    """``[function(*args) for args in calls]``, ``jobs`` at a time, in that order.

    With ``jobs == 1`` everything runs in this process, one call after the other. The
    first failing job's exception is raised once the jobs already started have ended."""
    calls = list(calls)
    if jobs < 1:
        from rxf.errors import OptionError

        raise OptionError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(calls) <= 1:
        return [function(*args) for args in calls]
    with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=get_context("spawn"), initializer=_start_job,
                             initargs=(threads_per_job(jobs),)) as pool:
        futures = {pool.submit(function, *args): i for i, args in enumerate(calls)}
        results: list[Any] = [None] * len(calls)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
    return results
