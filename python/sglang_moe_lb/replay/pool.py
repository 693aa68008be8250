"""Run independent evaluation jobs in forked worker processes, and stop them cleanly.

The job's inputs (the trace, the placement timeline, SGLang's dispatch state) are set in a
module global before the fork, so the workers inherit them without pickling. Workers ignore
SIGINT: a Ctrl-C reaches the whole process group, and only the parent should react (one line,
exit 130, workers terminated); a SIGTERM to the parent is turned into ``Terminated`` by
``signals_as_exceptions`` and ends the same way (exit 143). A worker that dies (the OOM
killer's SIGKILL, a crash) ends the run with ``WorkerDied``: one line, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

import torch

__all__ = ["Terminated", "WorkerDied", "signals_as_exceptions", "run_jobs", "cpu_count", "describe_exit"]

_TASK: Callable | None = None
_THREADS = 1
_JOIN_S = 5.0  # how long to wait for a terminated worker before SIGKILL


class Terminated(BaseException):
    """SIGTERM received (a BaseException, like KeyboardInterrupt, so no handler swallows it)."""


class WorkerDied(RuntimeError):
    """A worker process ended without returning its result (killed, crashed)."""


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


def describe_exit(exitcodes: list[int | None]) -> str:
    """How the first abnormal worker ended, in words, from ``multiprocessing`` exit codes
    (``-N``: killed by signal N). The pool SIGTERMs the survivors once one died, so a
    SIGTERM is only named when nothing else is there."""
    bad = [c for c in exitcodes if c not in (None, 0)]
    first = next((c for c in bad if c != -signal.SIGTERM), bad[0] if bad else None)
    if first is None:
        return "it ended without a result"
    if first < 0:
        try:
            name = signal.Signals(-first).name
        except ValueError:
            name = "?"
        hint = "; out of memory?" if -first == signal.SIGKILL else ""
        return f"killed by signal {-first} ({name}){hint}"
    return f"exit status {first}"


def _stop(procs: list) -> None:
    """Terminate the workers still running and reap them (SIGKILL if one ignores SIGTERM)."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(_JOIN_S)
        if p.is_alive():
            p.kill()
            p.join()


def _serial(items: list) -> Iterator:
    for it in items:
        yield _call(it)


def _forked(items: list, workers: int) -> Iterator:
    """``(item, result)`` from ``workers`` forked processes, in completion order."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    before = set(mp.active_children())
    ex = ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx, initializer=_init_worker)
    procs: list = []
    try:
        futures = [ex.submit(_call, it) for it in items]
        # A fork-context pool starts all its workers at the first submit; keep our own handles
        # (public API) to name a dead one's exit and to stop them on any exit path.
        procs = [p for p in mp.active_children() if p not in before]
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except BrokenProcessPool:
                for p in procs:
                    p.join(_JOIN_S)
                raise WorkerDied(f"a worker process died ({describe_exit([p.exitcode for p in procs])})") from None
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        procs = procs or [p for p in mp.active_children() if p not in before]  # interrupted while submitting
        _stop(procs)  # every result is in, or we are failing: stop the workers now
        ex.shutdown(wait=True)


def run_jobs(task: Callable, items: Iterable, workers: int, threads: int = 1, progress: str | None = None) -> Iterator:
    """Yield ``(item, task(item))`` for every item, in completion order.

    ``workers > 1`` forks that many processes (they inherit ``task``'s closure); every worker
    is terminated when the iteration ends, fails or is interrupted. Raises ``WorkerDied`` when
    a worker process dies."""
    global _TASK, _THREADS
    items = list(items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=progress, unit="step", leave=False, dynamic_ncols=True)
    _TASK, _THREADS = task, threads
    try:
        results = _serial(items) if workers <= 1 or len(items) <= 1 else _forked(items, workers)
        with contextlib.closing(results):
            for out in results:
                if bar is not None:
                    bar.update(1)
                yield out
    finally:
        if bar is not None:
            bar.close()
        _TASK = None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
