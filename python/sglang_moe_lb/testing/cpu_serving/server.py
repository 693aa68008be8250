"""TEST AND DEMO ONLY: start, drive and stop a real SGLang 0.5.23 server on a CPU.

``launch_cpu_server`` runs ``python -m sglang_moe_lb.testing.cpu_serving.launch`` (the
AMX-override launcher) with the tiny DeepSeek-V3 and dummy weights, in its own process
group, with the environment the CPU engine needs:

* ``SGLANG_USE_CPU_ENGINE=1``;
* ``PYTHONPATH`` starting with ``stubs/`` (the ``sgl_kernel`` stand-in and the
  ``.dist-info`` that declares the CPU-shims plugin), enabled by ``SGLANG_MOE_LB_CPU_SHIMS=1``;
* ``SGLANG_CPU_OMP_THREADS_BIND`` splitting this process's CPUs between the ranks
  (``"0|1"`` for 2 ranks on 2 cores; SGLang asserts on NUMA nodes without it);
* ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (where recorder dumps go);
* ``SGLANG_MOE_LB_CPU_DUMMY_INIT=placement_invariant`` unless set (see ``dummy_weights``);
* ``OMP_NUM_THREADS`` = CPUs per rank and ``TORCHDYNAMO_DISABLE=1`` unless set (speed).

It waits until ``/health`` answers 200. On exit it sends SIGTERM to the launcher, then
SIGKILLs, by PID, every process still left in the server's process group or among its
recorded descendants, and unlinks the /dev/shm segments SGLang leaks, so nothing of the
server outlives it (``alive_pids()`` and ``leaked_shm()`` check that).
This is not how to deploy SGLang; it exists so that tests can run the real server.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Iterable, Sequence

from sglang_moe_lb.testing.cpu_serving.model_dir import prepare_model_dir
from sglang_moe_lb.testing.gloo_ranks import free_port

STUBS_DIR = Path(__file__).resolve().parent / "stubs"
# The entry-point name of the CPU shims (stubs/*.dist-info): SGLANG_PLUGINS set to this alone
# serves without the --moe-lb plugin (the fork form's test).
CPU_SHIMS_PLUGIN = "moe_lb_cpu_shims"

# Always passed: dummy weights, the intel_amx attention backend (made reachable by the
# launcher, served by the stub ops), no CUDA graphs, a small KV cache (without it the KV
# cache takes ~15 GB and ~24 s to allocate), loopback only, and --sleep-on-idle (an idle
# EP=2 server otherwise keeps ~1 of 2 cores busy polling).
BASE_ARGS = (
    "--load-format", "dummy",
    "--device", "cpu",
    "--attention-backend", "intel_amx",
    "--disable-cuda-graph",
    "--max-total-tokens", "16384",
    "--host", "127.0.0.1",
    "--sleep-on-idle",
)  # fmt: skip

# The EP=2 + EPLB configuration of the end-to-end tests.
EP2_EPLB_ARGS = (
    "--tp", "2", "--ep-size", "2",
    "--moe-a2a-backend", "none",
    "--ep-num-redundant-experts", "2",
    "--ep-dispatch-algorithm", "dynamic",
    "--init-expert-location", "trivial",
    "--enable-eplb", "--eplb-rebalance-num-iterations", "10",
    "--expert-distribution-recorder-mode", "stat",
)  # fmt: skip

EPLB_REBALANCE_RE = re.compile(r"\[EPLBManager\] rebalance end time=([0-9.]+)s")

_live: "weakref.WeakSet[ServerHandle]" = weakref.WeakSet()


class ServerStartError(RuntimeError):
    pass


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _num_cpus() -> int:
    return len(_cpus())


def omp_bind(num_ranks: int) -> str:
    """Split this process's CPUs into ``num_ranks`` contiguous groups: ``"0|1"``, ``"0-3|4-7"``."""
    cpus = _cpus()
    groups = []
    per = max(1, len(cpus) // num_ranks)
    for r in range(num_ranks):
        chunk = cpus[(r * per) % len(cpus) :][:per] or cpus[:per]
        contiguous = chunk == list(range(chunk[0], chunk[-1] + 1))
        groups.append(f"{chunk[0]}-{chunk[-1]}" if contiguous and len(chunk) > 1 else ",".join(map(str, chunk)))
    return "|".join(groups)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the launcher if the process that started it dies
    (even by SIGKILL), so a killed test run does not leave a server behind (Linux only).
    The signal follows the death of the *thread* that started it: start servers from a
    long-lived thread (the main one)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _shm_files_of(pid: int) -> set[str]:
    """/dev/shm files a live process has mapped or open (Linux /proc; empty elsewhere)."""
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip() if line.count(" ") >= 5 else ""
                if path.startswith("/dev/shm/"):
                    found.add(path.replace(" (deleted)", ""))
    except OSError:
        pass
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                found.add(target)
    except OSError:
        pass
    return found


def _http(method: str, url: str, payload: dict | None = None, timeout: float = 600.0):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
        return resp.status, body


class ServerHandle:
    """A running CPU SGLang server. Use as a context manager, or call ``stop()``."""

    def __init__(self, cmd, env, port, log_path, model_dir, recorder_dir, args):
        self.cmd = list(cmd)
        self.env = env
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self.model_dir = Path(model_dir)
        self.recorder_dir = Path(recorder_dir)
        self.args = list(args)
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._descendants: dict[int, float] = {}  # pid -> start time
        self._shm: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 300.0) -> "ServerHandle":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.recorder_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, killed as a whole in stop()
                preexec_fn=_die_with_parent,
            )
        _live.add(self)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        self._remember_descendants()
        return self

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._remember_descendants()  # so a failed start can still be cleaned up
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(f"server exited with code {code} during startup; log {self.log_path}:\n{self.log_tail()}")
            try:
                status, _ = _http("GET", self.base_url + "/health", timeout=5)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not healthy before timeout; log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def _remember_descendants(self) -> None:
        import psutil

        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                try:
                    self._descendants.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        for pid in [self.pid, *self._descendants]:
            self._shm.update(_shm_files_of(pid))

    def leaked_shm(self) -> list[str]:
        """/dev/shm files of this server's processes that still exist (should be none after stop)."""
        paths = {p for p in self._shm if os.path.exists(p)}
        for pid in [self.pid, *self._descendants]:
            paths.update(str(p) for p in Path("/dev/shm").glob(f"sgl_shm_*_{pid}_*"))
        return sorted(paths)

    def _unlink_shm(self) -> None:
        """SGLang tears its processes down with SIGKILL and leaks /dev/shm segments (24 MB each)."""
        paths = set(self._shm)
        for pid in [self.pid, *self._descendants]:
            paths.update(str(p) for p in Path("/dev/shm").glob(f"sgl_shm_*_{pid}_*"))
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _live_processes(self) -> list:
        """psutil.Process objects of this server still running: members of its process group,
        and recorded descendants (matched by PID *and* start time, so a reused PID is not ours)."""
        import psutil

        if self.process is None:
            return []
        found = {}
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == self.pid:
                    found[p.pid] = p
            except (OSError, psutil.Error):
                pass
        for pid, started in self._descendants.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = p
            except psutil.Error:
                pass
        return [found[k] for k in sorted(found)]

    def alive_pids(self) -> list[int]:
        """PIDs of this server's processes still running (should be empty after ``stop()``)."""
        return [p.pid for p in self._live_processes()]

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM to the launcher (SGLang then stops its children), SIGKILL to whatever of the
        server is left after ``grace`` s, reap, and unlink the /dev/shm segments it leaked."""
        proc = self.process
        if proc is None:
            return
        self._remember_descendants()
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        for p in self._live_processes():
            try:
                p.kill()
            except Exception:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while self.alive_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self.alive_pids():
            self._unlink_shm()
        _live.discard(self)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str, timeout: float = 60.0):
        status, body = _http("GET", self.base_url + path, timeout=timeout)
        return json.loads(body) if body.strip().startswith((b"{", b"[")) else body.decode()

    def post(self, path: str, payload: dict | None = None, timeout: float = 600.0):
        status, body = _http("POST", self.base_url + path, payload if payload is not None else {}, timeout=timeout)
        text = body.decode()
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def generate(
        self,
        prompts: Sequence[str] | str,
        greedy: bool = True,
        max_new_tokens: int = 16,
        *,
        ignore_eos: bool = True,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        timeout: float = 600.0,
        **sampling,
    ) -> list[dict]:
        """POST /generate for all prompts in one request (one batch); returns one dict per prompt."""
        single = isinstance(prompts, str)
        params = {"max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos, **sampling}
        if greedy:
            params["temperature"] = 0.0
        payload = {"text": [prompts] if single else list(prompts), "sampling_params": params}
        if return_logprob:
            payload.update(return_logprob=True, top_logprobs_num=top_logprobs_num)
        out = self.post("/generate", payload, timeout=timeout)
        return out if isinstance(out, list) else [out]

    # ------------------------------------------------------------------ expert distribution recorder
    def start_expert_distribution_record(self):
        return self.post("/start_expert_distribution_record")

    def stop_expert_distribution_record(self):
        return self.post("/stop_expert_distribution_record")

    def dump_expert_distribution_record(self):
        return self.post("/dump_expert_distribution_record")

    def recorder_dumps(self) -> list[Path]:
        return sorted(self.recorder_dir.glob("expert_distribution_recorder_*.pt"), key=lambda p: p.stat().st_mtime)

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        # server_args lines are huge; keep tails readable
        lines = [ln if len(ln) < 2000 else ln[:2000] + " ...[cut]" for ln in self.log_text().splitlines()[-n:]]
        return "\n".join(lines)

    def wait_for_log(self, pattern: str | re.Pattern, timeout: float = 60.0, count: int = 1) -> list[re.Match]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = list(rx.finditer(self.log_text()))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    # ------------------------------------------------------------------ benchmark client
    def bench_serving(
        self,
        num_prompts: int = 8,
        input_len: int = 32,
        output_len: int = 8,
        *,
        output_file: Path | str | None = None,
        seed: int = 1,
        extra_args: Iterable[str] = (),
        timeout: float = 600.0,
    ) -> dict:
        """Run ``python -m sglang.bench_serving`` (random-ids, no downloads) against this server.

        Returns the parsed result line of ``--output-file``, with ``_log`` (the client's output).
        """
        out = Path(output_file) if output_file else self.log_path.with_name(f"bench_{self.port}_{time.time_ns()}.jsonl")
        if out.exists():
            out.unlink()
        cmd = [
            sys.executable, "-m", "sglang.bench_serving",
            "--backend", "sglang", "--host", "127.0.0.1", "--port", str(self.port),
            "--dataset-name", "random-ids",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", "1.0",
            "--num-prompts", str(num_prompts),
            "--tokenizer", str(self.model_dir),
            "--seed", str(seed), "--disable-tqdm",
            "--output-file", str(out),
            *extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items()}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench_serving failed (rc={res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
        lines = [ln for ln in out.read_text().splitlines() if ln.strip()]
        result = json.loads(lines[-1])
        result["_log"] = res.stdout
        return result


def server_env(
    num_ranks: int, recorder_dir: Path | str, extra_env: dict | None = None, base_env: dict | None = None
) -> dict:
    env = dict(os.environ if base_env is None else base_env)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["SGLANG_MOE_LB_CPU_SHIMS"] = "1"
    env.setdefault("SGLANG_MOE_LB_CPU_DUMMY_INIT", "placement_invariant")
    env["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"] = str(recorder_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(STUBS_DIR), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["PYTHONUNBUFFERED"] = "1"
    if num_ranks > 1:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = omp_bind(num_ranks)
    # Without the CPU sgl_kernel nothing pins the ranks' OpenMP pools: each rank would spin
    # nproc threads on shared cores (a 16x slower decode on 2 cores).
    env.setdefault("OMP_NUM_THREADS", str(max(1, _num_cpus() // max(1, num_ranks))))
    # torch.compile (SGLang compiles its top-k post-processing) costs ~15 s of start-up on
    # CPU and buys nothing for a tiny model; extra_env={"TORCHDYNAMO_DISABLE": "0"} restores it.
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env.update(extra_env or {})
    return env


def launch_cpu_server(
    extra_args: Sequence[str] = (),
    ep: int = 1,
    port: int | None = None,
    log_path: Path | str | None = None,
    *,
    model_dir: Path | str | None = None,
    recorder_dir: Path | str | None = None,
    extra_env: dict | None = None,
    timeout: float = 300.0,
) -> ServerHandle:
    """Start a CPU SGLang server and wait until it is healthy; returns a started ``ServerHandle``.

    ``ep`` > 1 adds ``--tp ep --ep-size ep`` unless ``extra_args`` already sets ``--tp``.
    Use ``with launch_cpu_server(...) as srv:`` so the process group is killed on exit.
    """
    args = list(extra_args)
    if ep > 1 and _arg_value(args, "--tp") is None and _arg_value(args, "--tp-size") is None:
        args = ["--tp", str(ep), "--ep-size", str(ep), *args]
    num_ranks = int(_arg_value(args, "--tp") or _arg_value(args, "--tp-size") or 1)
    port = port or free_port()
    if log_path is None or recorder_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix=f"sglang_cpu_{port}_"))
        log_path = log_path or run_dir / "server.log"
        recorder_dir = recorder_dir or run_dir / "expert_distribution"
    log_path, recorder_dir = Path(log_path), Path(recorder_dir)
    model_dir = Path(model_dir) if model_dir else prepare_model_dir()
    cmd = [
        sys.executable, "-m", "sglang_moe_lb.testing.cpu_serving.launch",
        "--model-path", str(model_dir), *BASE_ARGS, "--port", str(port), *args,
    ]  # fmt: skip
    env = server_env(num_ranks, recorder_dir, extra_env)
    handle = ServerHandle(cmd, env, port, log_path, model_dir, recorder_dir, args)
    return handle.start(timeout=timeout)


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        handle.stop(grace=1.0)
