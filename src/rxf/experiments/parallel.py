"""Several runs at once on one machine, the cores divided between them (``--jobs N``).

A small model keeps two cores busier as two single-thread processes than as one
two-thread process (its matrices are too small for two threads to split well; see
docs/performance.md), so ``rxf compare``, ``chain`` and ``sweep`` can run N jobs at once,
each in a process of its own with ``cores // N`` threads. Processes are started with
``spawn`` (a fresh interpreter: no torch state shared with the parent) and every job's
exception reaches the caller.

Stopping: the command's process is the only one that answers Ctrl-C (the workers ignore
SIGINT); it then terminates every worker at once, and queued runs never start (a pool left
to itself would go on to start them while it waited for the running ones). A worker
also dies with the command (Linux: the parent-death signal), so a command killed by
SIGTERM or SIGKILL leaves no run going on behind it, which a restarted command would
otherwise race in the same run folders. A run stopped either way is like a run killed
with ``kill -9``: the next command resumes it from its last checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import active_children, get_context
from typing import Any, Callable, Iterable

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when the process that started it ends."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not fatal: Ctrl-C and errors still stop the workers through the pool
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os._exit(1)


def _start_job(threads: int, parent: int) -> None:
    """In each job's process: its share of the cores, the command's quiet output, and
    the command in charge of interrupts and of this process's life."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    import threading

    import torch
    from tqdm import tqdm

    # tqdm's default lock is a named multiprocessing semaphore; a worker terminated by an
    # interrupt never releases it, and Python then reports it as leaked. Workers print no
    # progress bars, so a thread lock serves.
    tqdm.set_lock(threading.RLock())

    from rxf.console import quiet_libraries

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for any library that reads it later
    quiet_libraries()


def run_jobs(function: Callable, calls: Iterable[tuple], jobs: int = 1) -> list[Any]:
    """``[function(*args) for args in calls]``, ``jobs`` at a time, in that order.

    With ``jobs == 1`` everything runs in this process, one call after the other.
    Otherwise a job's exception is raised once every other job has ended (they are
    independent runs; a worker that dies, killed or out of memory, fails the jobs left),
    and an interrupt of this process (Ctrl-C, or any exception while it waits) terminates
    the workers at once and starts no queued job."""
    calls = list(calls)
    if jobs < 1:
        from rxf.errors import OptionError

        raise OptionError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(calls) <= 1:
        return [function(*args) for args in calls]
    others = set(active_children())
    pool = ProcessPoolExecutor(min(jobs, len(calls)), mp_context=get_context("spawn"), initializer=_start_job,
                               initargs=(threads_per_job(jobs), os.getpid()))
    try:
        futures = [pool.submit(function, *args) for args in calls]
        results: list[Any] = []
        first_error: Exception | None = None
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:
                first_error = first_error or exc
                results.append(None)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        # The pool's workers are the children that were not there before it (a pool spawns
        # them as jobs are submitted and never replaces one).
        workers = set(active_children()) - others
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()
        pool.shutdown()  # returns at once, its workers gone
        raise
    pool.shutdown()
    if first_error is not None:
        raise first_error
    return results
