"""TEST AND DEMO ONLY: keep one CPU SGLang server up until told to stop (used by scripts/demo_server.sh).

    python -m sglang_moe_lb.testing.cpu_serving.serve --port P --out-dir DIR [--ep 2] -- <server args>
    python -m sglang_moe_lb.testing.cpu_serving.serve --kill-leftovers DIR/server.json

Starts the server with ``launch_cpu_server`` (same environment, lifecycle and clean-up as the
tests), writes ``DIR/server.json`` (``port``, ``url``, ``pid`` of the launcher, ``procs``: [pid, start
time] of every server process, ``log``, ``recorder_dir``, ``startup_s``) once ``/health``
answers, then waits.
SIGTERM, SIGINT or SIGHUP stop the server: SIGTERM to the launcher, then SIGKILL by PID to
whatever of it is left, and the /dev/shm segments it leaked are removed. Exit status 0 after a
clean stop, 3 if the server failed to start (the log's tail is printed), 4 if it died while
being served.

``--kill-leftovers FILE`` is the last resort of a caller whose wrapper could not stop cleanly:
it SIGKILLs each process listed in ``procs`` that is still alive *with the same start time*
(so a reused PID is never hit) and prints what it killed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from sglang_moe_lb.testing.cpu_serving.server import ServerStartError, launch_cpu_server

_stop = False
_serving = False


def _on_signal(signum, _frame) -> None:
    global _stop
    if not _serving:
        # Still starting: unwind out of launch_cpu_server, which stops what it started.
        raise KeyboardInterrupt(f"signal {signum} during start-up")
    _stop = True


def kill_leftovers(info_path: Path) -> list[int]:
    import psutil

    killed = []
    for pid, started in json.loads(Path(info_path).read_text()).get("procs", []):
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                killed.append(pid)
        except psutil.Error:
            pass
    return killed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill-leftovers", metavar="SERVER_JSON", help="SIGKILL the listed server processes still alive")
    ap.add_argument("--port", type=int)
    ap.add_argument("--out-dir", help="server.log, expert_distribution/ and server.json go here")
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /health")
    ap.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: sglang.launch_server arguments")
    args = ap.parse_args(argv)
    if args.kill_leftovers:
        killed = kill_leftovers(Path(args.kill_leftovers))
        print(f"killed leftover server processes: {killed}" if killed else "no leftover server processes")
        return 0
    if args.port is None or args.out_dir is None:
        ap.error("--port and --out-dir are required")
    server_args = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    global _serving
    try:
        srv = launch_cpu_server(
            server_args, ep=args.ep, port=args.port, log_path=out / "server.log",
            recorder_dir=out / "expert_distribution", timeout=args.timeout,
        )  # fmt: skip
    except ServerStartError as e:
        print(f"server failed to start: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("interrupted during start-up; server stopped", file=sys.stderr, flush=True)
        return 130
    _serving = True
    code = 0
    try:
        info = {
            "port": srv.port, "url": srv.base_url, "pid": srv.pid,
            "procs": [[p.pid, p.create_time()] for p in srv._live_processes()],
            "log": str(srv.log_path), "recorder_dir": str(srv.recorder_dir), "startup_s": round(srv.startup_s, 1),
        }  # fmt: skip
        tmp = out / "server.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(out / "server.json")
        while not _stop:
            if srv.process.poll() is not None:
                print(f"server exited with code {srv.process.returncode}; log {srv.log_path}:\n{srv.log_tail()}",
                      file=sys.stderr, flush=True)  # fmt: skip
                code = 4
                break
            time.sleep(0.5)
    finally:
        srv.stop()
        left = srv.alive_pids()
        if left:
            print(f"server processes still alive after stop: {left}", file=sys.stderr, flush=True)
            code = code or 5
    return code


if __name__ == "__main__":
    sys.exit(main())
