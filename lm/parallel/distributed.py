"""Multi-process start-up and failing fast when a peer dies (per-process rows: lm.parallel.sharding.batch_shard).

One code path from 1 CPU to a pod, on JAX's own runtime (`jax.distributed`):

  * Cloud TPU: `config.distributed.auto = True`; `jax.distributed.initialize()` finds the
    coordinator, the process count and this process's id from the TPU metadata.
  * Elsewhere: `coordinator_address` ('host:port' of process 0), `num_processes` and
    `process_id`, from config or the environment (LM_COORDINATOR_ADDRESS, LM_NUM_PROCESSES,
    LM_PROCESS_ID; config wins).
  * Neither: a single-process run; nothing is initialized.

On CPU, cross-process collectives go through gloo (`config.distributed.cpu_collectives`).

Failure handling. Left alone, JAX's runtime notices a dead process after its heartbeat
timeout and aborts every other process with a C++ check-failure stack; and a process whose
Python code raises keeps heartbeating at the runtime's shutdown barrier while its peers block
in the next collective, for up to 5 minutes. Here a `Watchdog` thread per process watches its
peers through the coordination service's key-value store: when a peer is silent for
`heartbeat_timeout_s` (or the coordinator stops answering), it prints one line naming the lost
process and exits with EXIT_PEER_LOST. A process that raises prints its traceback, records
'failed: <error>' for its peers (who then exit at once, naming it) and exits with EXIT_FAILED.
One case is out of Python's reach: a process that loses the coordinator (process 0) is aborted
by JAX's C++ client at once. So each process forks first (`config.distributed.supervisor`): the
parent waits for the child that runs the job and turns that abort into a clear line and
EXIT_PEER_LOST. Nothing hangs silently.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any

import jax

EXIT_PEER_LOST = 75  # exit status of a process whose peer died (EX_TEMPFAIL: worth a restart)
EXIT_FAILED = 1  # exit status of a process whose own Python code raised
_ENV = {"coordinator_address": "LM_COORDINATOR_ADDRESS", "num_processes": "LM_NUM_PROCESSES",
        "process_id": "LM_PROCESS_ID"}
_state: dict[str, Any] = {}


def _field(dc: Any, name: str, default: Any = None) -> Any:
    if dc is None:
        return default
    try:
        value = dc[name]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def resolve(config: Any, environ: dict | None = None) -> dict | None:
    """The arguments of this run's `jax.distributed.initialize`, or None for a single process.

    Returns {'auto': bool, 'coordinator_address', 'num_processes', 'process_id',
    'heartbeat_timeout_s', 'initialization_timeout_s', 'cpu_collectives', 'supervisor'}.
    """
    environ = os.environ if environ is None else environ
    dc = config.get("distributed") if hasattr(config, "get") else None
    explicit = {k: _field(dc, k) if _field(dc, k) is not None else environ.get(env) or None
                for k, env in _ENV.items()}
    auto = bool(_field(dc, "auto", False))
    if not auto and explicit["coordinator_address"] is None:
        if explicit["num_processes"] is not None and int(explicit["num_processes"]) > 1:
            raise ValueError(f"distributed: num_processes={explicit['num_processes']} but no coordinator "
                             "address; set config.distributed.coordinator_address or LM_COORDINATOR_ADDRESS "
                             "(or distributed.auto=True on Cloud TPU)")
        return None
    out = {
        "auto": auto and explicit["coordinator_address"] is None,
        "coordinator_address": explicit["coordinator_address"],
        "num_processes": None if explicit["num_processes"] is None else int(explicit["num_processes"]),
        "process_id": None if explicit["process_id"] is None else int(explicit["process_id"]),
        "heartbeat_timeout_s": int(_field(dc, "heartbeat_timeout_s", 60)),
        "initialization_timeout_s": int(_field(dc, "initialization_timeout_s", 300)),
        "cpu_collectives": _field(dc, "cpu_collectives", "gloo"),
        "supervisor": bool(_field(dc, "supervisor", True)),
    }
    if not out["auto"]:
        missing = [f"{k} (config.distributed.{k} or {_ENV[k]})" for k in ("num_processes", "process_id")
                   if out[k] is None]
        if missing:
            raise ValueError(f"distributed: coordinator_address={out['coordinator_address']!r} also needs "
                             + " and ".join(missing))
        if not 0 <= out["process_id"] < out["num_processes"]:
            raise ValueError(f"distributed: process_id={out['process_id']} must be in "
                             f"[0, num_processes={out['num_processes']})")
    if out["heartbeat_timeout_s"] < 1:
        raise ValueError(f"distributed.heartbeat_timeout_s must be >= 1, got {out['heartbeat_timeout_s']}")
    return out


def maybe_initialize(config: Any) -> bool:
    """Initialize jax.distributed if this run is multi-process. Returns whether it did.

    Call it first, before anything touches a JAX device.
    """
    args = resolve(config)
    if args is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if args["cpu_collectives"]:
        jax.config.update("jax_cpu_collectives_implementation", args["cpu_collectives"])
    # JAX's own heartbeat check (which aborts with a C++ stack) is the backstop, behind the Watchdog
    kwargs = dict(initialization_timeout=args["initialization_timeout_s"],
                  heartbeat_timeout_seconds=2 * args["heartbeat_timeout_s"] + 10)
    if not args["auto"]:
        kwargs.update(coordinator_address=args["coordinator_address"],
                      num_processes=args["num_processes"], process_id=args["process_id"])
    _state.update(args)
    if args["supervisor"]:
        _supervise()
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if args["auto"] and "coordinator_address" in str(e):
            raise RuntimeError("distributed.auto=True, but JAX found no cluster to join (is this a Cloud "
                               "TPU VM?); for a single-process run set --config.distributed.auto=False") from e
        raise
    _start_watchdog(args["heartbeat_timeout_s"])
    _install_excepthook()
    return True


# -- failing fast --------------------------------------------------------------------------------

_PREFIX = "lm/alive/"


class Watchdog:
    """Peer liveness over the coordination service's key-value store.

    A thread bumps this process's counter under `lm/alive/<id>` every `interval` seconds and
    reads everyone's; a second thread (never blocked on RPCs) ends the process with one clear
    line and EXIT_PEER_LOST when a peer's counter has not moved for `timeout` seconds, when a
    peer recorded that it failed, or when the coordinator has not answered for `timeout`
    seconds. A process that finishes normally writes 'done' and is no longer watched.
    JAX's own heartbeat check runs with a longer timeout, as a backstop.
    """

    def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float,
                 exit_fn=os._exit):
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, float(timeout)
        self.interval = max(0.2, min(5.0, self.timeout / 10))
        now = time.monotonic()
        self.last_change = {p: now for p in range(num_processes) if p != process_id}
        self.last_value: dict[int, str] = {}
        self.last_answer = now
        self.finished: set[int] = set()
        self.stopped = threading.Event()
        self.exit_fn = exit_fn
        self.count = 0
        self.exiting = False  # set once this watchdog has judged a peer lost and is ending the process

    def start(self) -> "Watchdog":
        for target, name in ((self._beat, "lm-heartbeat"), (self._judge, "lm-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()
        return self

    def stop(self, final: str = "done") -> None:
        """Record `final` ('done' or 'failed: …') for the peers and stop watching."""
        self.stopped.set()
        try:
            self.client.key_value_set(f"{_PREFIX}{self.me}", final, allow_overwrite=True)
        except Exception:  # noqa: BLE001 — the coordinator may be gone already
            pass

    def _beat(self) -> None:
        while not self.stopped.is_set():
            try:
                self.count += 1
                self.client.key_value_set(f"{_PREFIX}{self.me}", str(self.count), allow_overwrite=True)
                entries = self.client.key_value_dir_get(_PREFIX)
                now = time.monotonic()
                self.last_answer = now
                for key, value in entries:
                    peer = int(key.rsplit("/", 1)[1])
                    if peer == self.me or peer not in self.last_change:
                        continue
                    if value == "done":
                        self.finished.add(peer)
                    elif value.startswith("failed"):
                        return self._exit(f"process {peer} of {self.n} {value}")
                    elif value != self.last_value.get(peer):
                        self.last_value[peer], self.last_change[peer] = value, now
            except Exception:  # noqa: BLE001 — judged by `last_answer` going stale
                pass
            self.stopped.wait(self.interval)

    def _judge(self) -> None:
        while not self.stopped.wait(self.interval / 2):
            now = time.monotonic()
            if now - self.last_answer > self.timeout:
                return self._exit(f"the coordinator ({_state.get('coordinator_address') or 'process 0'}) has "
                                  f"not answered for {self.timeout:.0f}s (process 0 died or the network is down)")
            # a peer is silent when the coordinator answers but the peer's counter stands still
            silent = sorted(p for p, t in self.last_change.items()
                            if p not in self.finished and self.last_answer - t > self.timeout)
            if silent:
                return self._exit(f"process {', '.join(map(str, silent))} of {self.n} sent no heartbeat for "
                                  f"{self.timeout:.0f}s (it died, was killed, or is stuck outside Python)")

    def _exit(self, what: str) -> None:
        if self.stopped.is_set():
            return
        self.exiting = True  # before `stopped`: a thread woken by `stopped` must see it
        self.stopped.set()
        sys.stdout.flush()
        sys.stderr.write(f"\nlm.parallel.distributed: process {self.me} of {self.n}: {what}; exiting with status "
                         f"{EXIT_PEER_LOST} instead of waiting. See that process's log for the cause.\n")
        sys.stderr.flush()
        self.exit_fn(EXIT_PEER_LOST)  # the main thread may be blocked in a collective: do not wait for it


def _supervise() -> None:
    """Fork. The child returns and runs the job; this process (the one the launcher, the shell or
    a test knows by its id) waits for it and exits with its status. Where the runtime aborted the
    child (JAX's C++ client aborts at once when it loses the coordinator), it prints one clear line
    instead and exits with EXIT_PEER_LOST. SIGTERM, SIGHUP and SIGUSR1/2 are passed on (SIGINT from
    a terminal reaches both already); the child dies with this process (PR_SET_PDEATHSIG)."""
    if not hasattr(os, "fork") or threading.active_count() > 1 or not sys.platform.startswith("linux"):
        return  # forking a process with threads is unsafe; then JAX's own abort message stands
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(EXIT_PEER_LOST)
        return
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, status = os.waitpid(child, 0)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    if sig == signal.SIGABRT:
        me, n = _state.get("process_id"), _state.get("num_processes")
        who = f"process {me} of {n}" if me is not None else "this process"
        sys.stderr.write(f"\nlm.parallel.distributed: {who}: the JAX runtime aborted it: "
                         f"{_coordinator_status()}; exiting with status {EXIT_PEER_LOST}. The lines above "
                         "are the runtime's; see the other processes' logs for the cause.\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)
    os._exit(128 + sig)


def _coordinator_status() -> str:
    """Whether the coordinator still accepts connections (when an address was given)."""
    address = _state.get("coordinator_address")
    if not address:
        return "it lost the coordination service (a process died, or the network failed)"
    if _state.get("process_id") == 0:  # the service runs here: it aborts us when it loses a peer
        return "this process hosts the coordinator, so another process died or the network failed"
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return f"the coordinator at {address} is up, so another process died or the network failed"
    except OSError:
        return f"the coordinator at {address} (process 0) is gone: process 0 died or is unreachable"


def _start_watchdog(timeout: float) -> None:
    from jax._src import distributed as jd  # the runtime client jax.distributed created

    client = getattr(jd.global_state, "client", None)
    if client is None or jax.process_count() < 2:
        return
    dog = Watchdog(client, jax.process_index(), jax.process_count(), timeout).start()
    _state["watchdog"] = dog
    atexit.register(dog.stop, "done")


def _install_excepthook() -> None:
    """An uncaught exception: print it as usual, tell the peers ('failed: …'), and leave at once
    with EXIT_FAILED instead of waiting, alive, at the runtime's shutdown barrier."""
    if getattr(sys.excepthook, "_lm_distributed", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            previous(exc_type, exc, tb)
            dog = _state.get("watchdog")
            if dog is not None and exc_type.__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
                # a failed collective is most often a peer's death: give the watchdog time to name it
                # (it ends the process itself when it does)
                sys.stderr.write("lm.parallel.distributed: a runtime error; checking whether another process died\n")
                sys.stderr.flush()
                dog.stopped.wait(dog.timeout + 3 * dog.interval)
                if dog.exiting:  # it named the lost peer and is exiting with EXIT_PEER_LOST: leave the
                    # status to it rather than race it with EXIT_FAILED (seen under load in CI)
                    time.sleep(10)
                    os._exit(EXIT_PEER_LOST)
            sys.stderr.write(f"lm.parallel.distributed: process {jax.process_index()} of {jax.process_count()} failed "
                             f"({exc_type.__name__}); exiting now so that the others stop too\n")
            if dog is not None:
                dog.stop(f"failed: {exc_type.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAILED)

    hook._lm_distributed = True  # type: ignore[attr-defined]
    sys.excepthook = hook
