"""Run independent evaluation jobs in forked worker processes, and stop them cleanly.

The job's inputs (the trace, the placement timeline, SGLang's dispatch state) are set in a
module global before the fork, so the workers inherit them without pickling. Workers ignore
SIGINT: a Ctrl-C reaches the whole process group, and only the parent should react (one line,
exit 130, workers terminated); a SIGTERM to the parent is turned into ``Terminated`` by
``signals_as_exceptions`` and ends the same way (exit 143).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Callable, Iterable, Iterator

import torch

__all__ = ["Terminated", "signals_as_exceptions", "run_jobs"]

_TASK: Callable | None = None
_THREADS = 1


class Terminated(BaseException):
    """SIGTERM received (a BaseException, like KeyboardInterrupt, so no handler swallows it)."""


@contextlib.contextmanager
def signals_as_exceptions():
    """While inside: SIGTERM raises ``Terminated`` in the main thread."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(_THREADS)


def _call(item):
    return item, _TASK(item)


def run_jobs(task: Callable, items: Iterable, workers: int, threads: int = 1, progress: str | None = None) -> Iterator:
    """Yield ``(item, task(item))`` for every item, in completion order.

    ``workers > 1`` forks that many processes (they inherit ``task``'s closure); every worker
    is terminated when the iteration ends, fails or is interrupted."""
    global _TASK, _THREADS
    items = list(items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=progress, unit="step", leave=False, dynamic_ncols=True)
    pool = None
    _TASK, _THREADS = task, threads
    try:
        if workers <= 1 or len(items) <= 1:
            results = map(_call, items)
        else:
            import multiprocessing as mp

            pool = mp.get_context("fork").Pool(min(workers, len(items)), initializer=_init_worker)
            results = pool.imap_unordered(_call, items, chunksize=1)
        for out in results:
            if bar is not None:
                bar.update(1)
            yield out
    finally:
        if pool is not None:
            pool.terminate()  # every result is in, or we are failing: stop the workers now
            pool.join()
        if bar is not None:
            bar.close()
        _TASK = None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
