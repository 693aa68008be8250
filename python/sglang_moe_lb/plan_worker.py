"""Plan solves in a separate process, so they never hold the forward thread's interpreter lock.

A plan solve is mostly small numpy operations; in a thread of the serving process it would
take the interpreter lock for most of its run and slow every forward pass that runs meanwhile
(``benchmark/bench_plan.py`` measures both). ``PlanWorker`` keeps one helper process (started
by ``start()`` or the first solve, reused, replaced when it dies or is stopped) that runs
``plan.solve_rows``; a request is a ``(rows, window, cost, options)`` tuple, a reply the
layer -> (weights, error) dict, both plainly pickled over two pipes (``Connection.send`` would
use torch's shared-memory reductions, which need a multiprocessing parent).

The helper is a fresh interpreter (``python -m sglang_moe_lb.plan_worker``), not a
multiprocessing child: a spawned child would re-import the serving process's main module (in
SGLang's scheduler, all of ``sglang.launch_server``: tens of seconds under load, measured), and
a forked one would copy CUDA state. It imports torch and the core only, uses one BLAS thread
and runs at ``nice`` 10: background work beside the serving threads.

Used by the plugin's plan cycle (``plugin/rebalance.py``); nothing here imports SGLang.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

__all__ = ["PlanWorker", "WorkerGone"]

_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds sglang_moe_lb/


class WorkerGone(RuntimeError):
    """The worker process ended (stopped after a time-out, or died) before replying."""


def _serve(inbox: Connection, outbox: Connection) -> None:
    """The helper's loop: one request in, one reply out, until the pipe closes or None arrives."""
    import torch

    from .plan import solve_rows

    torch.set_num_threads(1)
    try:
        os.nice(10)
    except OSError:
        pass
    while True:
        try:
            req = pickle.loads(inbox.recv_bytes())
        except (EOFError, OSError):
            return
        if req is None:
            return
        rows, window, cost, kw = req
        try:
            reply = solve_rows(rows, window, cost, **kw)
        except Exception as err:  # noqa: BLE001 - reported to the caller, which keeps its plans
            reply = {layer: (None, f"{type(err).__name__}: {err}") for layer in rows}
        outbox.send_bytes(pickle.dumps(reply))


class PlanWorker:
    """One background process running plan solves, one request at a time."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the process now if none is running (it imports torch: seconds), without waiting."""
        with self._lock:
            self._ensure()

    def solve(self, rows: dict, window, cost, **kw) -> dict:
        """Send one request and wait for its reply (call from a helper thread: it blocks).

        Raises ``WorkerGone`` if the process ends first."""
        with self._lock:
            send, recv = self._ensure()
            proc = self._proc
        try:
            send.send_bytes(pickle.dumps((rows, window, cost, kw)))
            return pickle.loads(recv.recv_bytes())
        except (EOFError, OSError, TypeError) as err:  # TypeError: the pipe closed under a stop()
            with self._lock:
                if self._proc is proc:  # forget it now, so the next solve starts another
                    self._proc = None
                    self._close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise WorkerGone(f"the plan worker process ended ({type(err).__name__})") from None

    def _ensure(self) -> tuple[Connection, Connection]:
        """The live process's pipes, starting a process first if needed (call under the lock)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._send, self._recv
        self._close()
        down_r, down_w = os.pipe()  # requests: parent -> child
        up_r, up_w = os.pipe()  # replies: child -> parent
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, **_ONE_THREAD,
                   PYTHONPATH=_PACKAGE_ROOT + (os.pathsep + path if path else ""))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "sglang_moe_lb.plan_worker", str(down_r), str(up_w)],
                pass_fds=(down_r, up_w), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise
        os.close(down_r)
        os.close(up_w)
        self._send, self._recv = Connection(down_w, readable=False), Connection(up_r, writable=False)
        return self._send, self._recv

    def _close(self) -> None:
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None

    def stop(self) -> None:
        """End the process now (a time-out: its solve is dropped); the next ``solve`` starts another."""
        with self._lock:
            proc, self._proc = self._proc, None
            # End the process before closing the pipes: a solve blocked on them then sees the
            # end of its pipe (WorkerGone) rather than a handle closed under it.
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
