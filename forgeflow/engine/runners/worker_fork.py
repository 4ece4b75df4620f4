"""Workers forked from a warm template: a plugin's heavy imports once per runner, not once per worker.

A vision plugin's worker spends ~3 core-s importing torch and Ultralytics (its ``Plugin(preload=...)``
modules) before it loads a model: every worker of the detector and of the pose estimator paid it
again, on the first run of a new user (two such workers while Prefect's server starts on the same two
cores) and whenever a pool grows in a burst. A **fork server** imports a set of preload modules once;
every later worker of a plugin that preloads the same modules is a fork of it (~10 ms), which then
loads its plugin and answers ``ready`` as a spawned worker does.

A forked worker is the worker a spawn makes, started differently:

* it runs :func:`forgeflow.engine.runners.worker.main` (``--plugin NAME``) with the runner's pipes as
  fds 0 and 1, the worker's log as fd 2 and every other descriptor closed;
* in a session of its own (its pid is its process group: a kill still takes its whole group);
* it dies with the server (``PR_SET_PDEATHSIG``), which dies with the runner's spawning thread;
* its exit status comes from the server, its parent (:class:`ForkedProcess` reads like a ``Popen``).

A runner spawns instead (``python -m forgeflow.engine.runners.worker --plugin NAME``) for a plugin
that preloads nothing (its worker starts in ~0.4 core-s; its memory stays free of torch's pages), with
``FORGEFLOW_WORKER_FORK_SERVER=false``, and when the server says forking is unsafe: another Python
thread runs after its imports, or they initialized CUDA (a child of a process that did cannot use it;
``PYTORCH_NVML_BASED_CUDA_CHECK=1`` keeps ``torch.cuda.is_available()`` from doing so). A server
that dies (a preload module that crashes the interpreter, say) takes its workers with it once; that
preload set's workers are spawned from then on.

Its control channel is a ``SOCK_SEQPACKET`` socket pair, one JSON object per packet; a ``fork``
request carries the child's three descriptors (``SCM_RIGHTS``):

server → runner: ``ready {pid, forkable, reason}``, ``forked {pid}`` or ``failed {error}`` (one per
``fork``, in order), ``exit {pid, returncode}`` whenever a child ends.
runner → server: ``fork {plugin}`` + fds (stdin, stdout, log).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from concurrent.futures import Executor
    from pathlib import Path

    from forgeflow.canonical import JsonObject

__all__ = ["ForkServer", "ForkServerGone", "ForkServers", "ForkedProcess", "serve_forks"]

log = logging.getLogger("forgeflow.runners.fork")

MODULE = "forgeflow.engine.runners.worker"
_PACKET = 64 * 1024


class ForkServerGone(RuntimeError):
    """The fork server is not there (it died, refused to fork, or never answered): spawn instead."""


# --- the runner's side -----------------------------------------------------------------------------


class ForkedProcess:
    """A worker the fork server forked, read like the ``subprocess.Popen`` of a spawned one: ``pid``,
    ``stdin`` (its requests), ``stdout`` (its answers), :meth:`poll`, :meth:`wait`, ``returncode``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.args = [MODULE, "(forked)"]
        self.stdin: IO[bytes] | None = None  # set by the request that asked for it
        self.stdout: IO[bytes] | None = None
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    """One fork server (one set of preload modules) and its reader thread. Thread-safe. Start it from
    the runner's long-lived spawning thread (it dies with the thread that started it); wait for it
    (:meth:`wait_ready`: its imports take seconds) and fork through it from any thread."""

    def __init__(self, preload: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.preload = tuple(preload)
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", MODULE, "--fork-server", str(theirs.fileno()), "--parent-pid", str(os.getpid())]
        cmd += [f"--preload={module}" for module in self.preload]
        try:
            with log_path.open("ab") as log_file:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                    env={**env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
                )
        finally:
            theirs.close()
        self.pid: int | None = None
        self._children: dict[int, ForkedProcess] = {}
        self._answers: queue.Queue[ForkedProcess | str] = queue.Queue()
        self._ready_lock = threading.Lock()
        self._fork_lock = threading.Lock()
        self._lock = threading.Lock()
        self._answer_timeout_s = 0.0
        self.gone = False
        self._closing = False

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the server has imported its modules and may fork (:class:`ForkServerGone` when
        it will not: it failed, refused, or took longer than ``timeout_s``)."""
        with self._ready_lock:
            if self.pid is not None:
                return
            if self.gone:
                raise ForkServerGone("the fork server is gone")
            self._sock.settimeout(timeout_s)
            try:
                ready = self._receive()
            except (OSError, ValueError) as exc:
                self.close()
                raise ForkServerGone(f"the fork server did not start: {exc}") from None
            if ready is None or ready.get("type") != "ready":
                self.close()
                raise ForkServerGone(f"the fork server did not start (exit code {self.proc.poll()})")
            if not ready.get("forkable"):
                self.close()
                raise ForkServerGone(f"the fork server will not fork: {ready.get('reason')}")
            self._sock.settimeout(None)
            self._answer_timeout_s = timeout_s
            threading.Thread(target=self._read, name="forgeflow-fork-server", daemon=True).start()
            self.pid = int(str(ready["pid"]))

    def fork(self, plugin: str, log_file: IO[bytes]) -> ForkedProcess:
        """A new worker of ``plugin`` (stderr appended to ``log_file``); :class:`ForkServerGone` when
        the server cannot make it."""
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        ours = [stdin_w, stdout_r]
        try:
            with self._fork_lock:  # one request at a time: answers come in order
                if self.gone:
                    raise ForkServerGone("the fork server is gone")
                message = json.dumps({"type": "fork", "plugin": plugin}).encode()
                try:
                    socket.send_fds(self._sock, [message], [stdin_r, stdout_w, log_file.fileno()])
                except OSError as exc:
                    raise ForkServerGone(f"the fork server is gone: {exc}") from None
                try:
                    answer = self._answers.get(timeout=self._answer_timeout_s)
                except queue.Empty:
                    self.close()
                    raise ForkServerGone("the fork server stopped answering") from None
            if isinstance(answer, str):
                raise ForkServerGone(answer)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        answer.stdin = open(stdin_w, "wb", buffering=0)  # noqa: SIM115 - the worker's, closed with it
        answer.stdout = open(stdout_r, "rb", buffering=0)  # noqa: SIM115
        return answer

    def close(self) -> None:
        """Stop the server (its workers die with it)."""
        self.gone = self._closing = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def _receive(self) -> JsonObject | None:
        data = self._sock.recv(_PACKET)
        if not data:
            return None
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError(f"the fork server sent {message!r}")
        return message

    def _read(self) -> None:
        """Hand each ``forked``/``failed`` answer to the request waiting for it, end each child the
        server reports; when the server goes, its children went with it."""
        try:
            while (message := self._receive()) is not None:
                kind = message.get("type")
                if kind == "forked":
                    child = ForkedProcess(int(str(message["pid"])))
                    with self._lock:
                        self._children[child.pid] = child
                    self._answers.put(child)
                elif kind == "failed":
                    self._answers.put(f"the fork server could not fork: {message.get('error')}")
                elif kind == "exit":
                    with self._lock:
                        ended = self._children.pop(int(str(message["pid"])), None)
                    if ended is not None:
                        ended.ended(int(str(message["returncode"])))
        except (OSError, ValueError) as exc:
            if not self._closing:
                log.warning("fork server of %s: %s", ", ".join(self.preload), exc)
        self.gone = True
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if not self._closing:
            log.warning("fork server of %s ended (%s)", ", ".join(self.preload), self.proc.returncode)
        self._answers.put("the fork server is gone")
        with self._lock:
            orphans, self._children = list(self._children.values()), {}
        for child in orphans:  # PR_SET_PDEATHSIG killed them with their parent
            child.ended(-signal.SIGKILL)


class ForkServers:
    """A runner's fork servers, one per set of preload modules, each started on first use; and the
    sets whose workers are spawned (the setting off, a server that would not fork or died)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, ready_timeout_s: float, *, enabled: bool) -> None:
        self._env, self._log_path, self._ready_timeout_s = env, log_path, ready_timeout_s
        self.enabled = enabled
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, ...], ForkServer] = {}
        self._spawned: set[tuple[str, ...]] = set()

    def fork(self, preload: tuple[str, ...], plugin: str, log_path: Path, spawner: Executor) -> ForkedProcess | None:
        """A worker of ``plugin`` (stderr appended to ``log_path``) forked from the server of
        ``preload``, or None: spawn it. A server starts in ``spawner`` (the runner's spawning thread);
        waiting for its imports holds up only the callers that need it."""
        try:
            with self._lock:
                if not self.enabled or preload in self._spawned:
                    return None
                server = self._servers.get(preload)
                if server is None:
                    try:
                        server = spawner.submit(ForkServer, preload, self._env, self._log_path).result()
                    except OSError as exc:
                        raise ForkServerGone(f"cannot start a fork server: {exc}") from None
                    self._servers[preload] = server
            server.wait_ready(self._ready_timeout_s)
            with log_path.open("ab") as log_file:
                return server.fork(plugin, log_file)
        except ForkServerGone as exc:
            with self._lock:
                if preload not in self._spawned:
                    log.warning("workers preloading %s are spawned from now on: %s", ", ".join(preload), exc)
                    self._spawned.add(preload)
            return None

    def close(self) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self.enabled = False
        for server in servers:
            server.close()


# --- the server ----------------------------------------------------------------------------------


def _fork_safety() -> str | None:
    """Why forking this process now would be unsafe, or None."""
    if threading.active_count() > 1:
        names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        return f"Python threads run after the preload imports: {', '.join(names)}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the preload imports initialized CUDA, which a forked child cannot use"
    return None


def serve_forks(control_fd: int, preload: Sequence[str], worker_main: Callable[[list[str]], int]) -> int:
    """The fork server's loop (``python -m forgeflow.engine.runners.worker --fork-server FD``):
    import ``preload``, answer ``ready``, then fork a worker per request (each runs ``worker_main``
    with ``--plugin NAME``) and report each one's end."""
    sock = socket.socket(fileno=control_fd)
    failed = []
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception as exc:  # each worker tries again and says why it cannot load
            failed.append(f"{module}: {type(exc).__name__}: {exc}")
    from forgeflow.engine.runners import worker_batch, worker_call  # noqa: F401 - what every worker imports
    from forgeflow.plugins.registry import installed_entry_points

    installed_entry_points()
    reason = _fork_safety()
    print(f"[fork server pid={os.getpid()} preload={list(preload)} failed={failed} unsafe={reason}]", file=sys.stderr)
    sock.send(json.dumps({"type": "ready", "pid": os.getpid(), "forkable": reason is None, "reason": reason}).encode())
    if reason is not None:
        return 0
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(sock, _PACKET, 3)
                except OSError:
                    data, fds = b"", []
                if not data:  # the runner is gone: so are we (the workers follow, PR_SET_PDEATHSIG)
                    return 0
                sock.send(json.dumps(_fork(json.loads(data), fds, sock, worker_main)).encode())
            else:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
        _reap(sock)


def _fork(
    request: JsonObject, fds: list[int], sock: socket.socket, worker_main: Callable[[list[str]], int]
) -> JsonObject:
    try:
        if request.get("type") != "fork" or len(fds) != 3:
            return {"type": "failed", "error": f"not a fork request: {request!r} with {len(fds)} descriptors"}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (its coverage is the worker's)
            _become_worker(str(request.get("plugin")), fds, sock, worker_main)
        return {"type": "forked", "pid": pid}
    except OSError as exc:
        return {"type": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        for fd in fds:
            os.close(fd)


def _become_worker(  # pragma: no cover - runs in the child
    plugin: str, fds: list[int], sock: socket.socket, worker_main: Callable[[list[str]], int]
) -> None:
    """In the child: the stdio and session of a spawned worker, then the worker itself; never returns."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        sock.detach()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        numpy = sys.modules.get("numpy")
        if numpy is not None:  # a fork shares its parent's random state: give each worker its own
            numpy.random.seed()
        code = worker_main(["--plugin", plugin, "--parent-pid", str(os.getppid())])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(sock: socket.socket) -> None:
    """Report every child that ended (a SIGCHLD may stand for several)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        message = {"type": "exit", "pid": pid, "returncode": os.waitstatus_to_exitcode(status)}
        with contextlib.suppress(OSError):
            sock.send(json.dumps(message).encode())
