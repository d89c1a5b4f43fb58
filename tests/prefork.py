"""A fork server for the tests' ``python -m clipkit ...`` processes (``tests.conftest.run_cli``).

Every CLI process a test starts spends its first seconds importing torch, torchvision, open_clip (with timm and
transformers), Hydra and webdataset: about 4 s of CPU each, some 120 times in ``make test``. This server imports
those third-party packages once, then forks one child per command. The child is still a process of its own (its
own pid, exit status, signals, environment, working directory, stdout/stderr files, loader workers); it runs
``python -m clipkit ARGS`` through ``runpy`` as the interpreter would, and imports clipkit itself fresh, so
whatever clipkit reads from the environment at import time (``CLIPKIT_FAULTS``, ...) comes from the command's
environment. What the server never imports before forking: clipkit, DeepSpeed, anything that starts a thread.
The command's loader workers come from a fork server of multiprocessing's own, forked from the command at its
start rather than started as a fresh interpreter (``_start_worker_server``: ~3 s less per rank of a run with
workers).

Tests about the shell, the interpreter's flags (``-X importtime``) or the launcher scripts keep starting real
processes (their workers' fork server is multiprocessing's fresh interpreter, as a user's); ``CLIPKIT_TEST_PREFORK=0``
turns the server off for a whole run (every ``run_cli`` a real ``python -m clipkit``).

Protocol (one Unix socket; commands run at once, each watched by a handler process forked for it): the client
sends one JSON line {args, env, cwd, stdout, stderr, inherit}; the server answers {"pid": ...} once the child runs,
then {"status": ...} (``subprocess``'s return code: negative for a signal) once it has ended. ``stdout``/``stderr``
are files the child creates, or with ``inherit`` the client's own open stdout/stderr (``/proc/PID/fd/1``: a pipe
or a file, written in append mode).

``Client.shim`` writes a ``clipkit`` executable that sends the command it was started with (its argv as the
shell expanded it, its environment and directory, its stdout/stderr) to the server, passes on the signals a
launcher sends (INT, TERM, USR1, HUP), and exits with the command's status (or is killed by the signal that
killed the command): with its folder first on PATH,
``bash -c "clipkit train ..."`` runs as typed minus the imports; as ``torchrun --no-python``'s program, each rank
is such a command.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import itertools
import json
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = (
    "numpy",
    "PIL.Image",
    "torch",
    "torchvision",
    "open_clip",
    "omegaconf",
    "hydra",
    "webdataset",
    "safetensors",
    "peft",
    "matplotlib.pyplot",  # (the run report's and the evaluators' figures: ~0.5 s a run that writes one)
)
MAIN = "clipkit"


def _child(request: dict) -> None:
    """Runs in the forked child: becomes `python -m clipkit ARGS` and never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        mode = os.O_APPEND if request.get("inherit") else os.O_CREAT | os.O_TRUNC
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | mode, 0o644)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        # torchvision imports torch._dynamo's config, which read TORCH_COMPILE_DISABLE from the server's
        # environment: read it again from the command's (the doc test sets it; inductor ran despite it).
        dynamo_config = sys.modules.get("torch._dynamo.config")
        if dynamo_config is not None:
            dynamo_config.disable = os.environ.get("TORCH_COMPILE_DISABLE", "0") == "1"
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # (read by the OpenMP runtime when torch loaded)
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        sys.path[0] = request["cwd"]
        _start_worker_server()
        sys.argv = ["-m", *request["args"]]
        try:
            runpy.run_module(request.get("module", MAIN), run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None:
                code = 0
            elif isinstance(stop.code, int):
                code = stop.code
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001  (the interpreter prints any uncaught exception and exits 1)
            traceback.print_exc()
            code = 1
        # What the interpreter does at exit: threading's own exit hooks (a ThreadPoolExecutor's, which tell its
        # workers to stop: inductor's compile pool has one), then wait for non-daemon threads, run atexit, flush.
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _start_worker_server() -> None:
    """In the command's process, before it runs anything: starts the fork server its loader workers will come
    from (``clipkit.data.worker_context``) as multiprocessing's ``forkserver.ensure_running`` would, except that
    the server is forked from this process (torch and open_clip already imported, one thread) instead of being a
    fresh interpreter that imports them again: ~3 s of CPU a run with loader workers, once per rank. The rest is
    multiprocessing's own: its ``forkserver.main`` loop with clipkit's preload list, the same socket, alive pipe
    and file descriptors handed to each worker; ``ensure_running`` finds it running and starts no other. Where
    multiprocessing's forkserver differs (another Python), nothing happens: it starts its own."""
    from multiprocessing import connection, forkserver

    server = getattr(forkserver, "_forkserver", None)
    names = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_preload_modules")
    if server is None or not all(hasattr(server, name) for name in names) or server._forkserver_pid is not None:
        return
    listener = socket.socket(socket.AF_UNIX)
    address = connection.arbitrary_address("AF_UNIX")
    listener.bind(address)
    os.chmod(address, 0o600)
    listener.listen()
    alive_r, alive_w = os.pipe()  # (every worker holds the write end; the server ends when all have closed it)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(alive_w)
            from clipkit.data import worker_context

            worker_context()  # (sets clipkit's preload list on multiprocessing's forkserver)
            forkserver.main(listener.fileno(), alive_r, server._preload_modules, sys_path=list(sys.path))
        except BaseException:  # noqa: BLE001  (SystemExit once the command and its workers are gone)
            pass
        finally:
            os._exit(0)
    os.close(alive_r)
    listener.close()
    server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid


def serve(path: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, threading.enumerate()  # (a fork copies only the forking thread)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(5)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:  # (reap the handlers that have finished)
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # (the pytest process is gone, killed without its atexit)
                return
            continue
        conn.settimeout(None)
        with conn:
            request = json.loads(conn.makefile("r").readline())
            if request.get("stop"):
                return
            # Commands run at once (the ranks of one torchrun job wait for each other): a handler process per
            # command forks the command and reports on it; the server goes back to accepting.
            if os.fork() == 0:
                server.close()
                _handle(conn, request)


def _handle(conn: socket.socket, request: dict) -> None:
    """In a handler process: forks the command, answers its pid, waits, answers its status, exits."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(request)
    try:
        conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall((json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n").encode())
    except OSError:
        pass  # (the client gave up: a timeout)
    finally:
        os._exit(0)


SHIM = """#!{python} -S
# clipkit, run by the tests' fork server (tests/prefork.py): this command's argv, environment, directory and
# stdout/stderr; exits with the command's status, or dies of the signal that ended the command.
import json, os, signal, socket, sys

me = os.getpid()
request = {{"args": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "inherit": True,
           "stdout": "/proc/%d/fd/1" % me, "stderr": "/proc/%d/fd/2" % me}}
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
    conn.connect({socket!r})
    conn.sendall((json.dumps(request) + "\\n").encode())
    reader = conn.makefile("r")
    pid = json.loads(reader.readline())["pid"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):  # (a launcher stopping its ranks)
        signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    status = json.loads(reader.readline())["status"]
if status < 0:  # (killed: the same signal ends this process, so its parent sees what it would have seen)
    if -status not in (signal.SIGKILL, signal.SIGSTOP):  # (those two cannot be caught: nothing to reset)
        signal.signal(-status, signal.SIG_DFL)
    os.kill(me, -status)
sys.exit(status if status >= 0 else 128 - status)
"""


class Command:
    """A command the server runs: its pid, and its outcome once it has ended."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str], out: str, err: str):
        self.conn, self.pid, self.args, self.out, self.err = conn, pid, args, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The status once the command has ended, else None (as ``Popen.poll``)."""
        if self.returncode is None and select.select([self.conn], [], [], 0)[0]:
            self.returncode = json.loads(_line(self.conn))["status"]
        return self.returncode

    def wait(self, timeout: float | None) -> subprocess.CompletedProcess:
        """Waits for the status (SIGKILL and ``TimeoutExpired``, with the output so far, after ``timeout`` s)."""
        self.conn.settimeout(timeout)
        try:
            if self.returncode is None:
                self.returncode = json.loads(_line(self.conn))["status"]
        except TimeoutError:
            self.kill()
            raise subprocess.TimeoutExpired(self.args, timeout, *self._outputs()) from None
        finally:
            self.conn.close()
        return subprocess.CompletedProcess(self.args, self.returncode, *self._outputs())

    def _outputs(self) -> list[str]:
        """stdout and stderr as the command wrote them; their files are removed once read."""
        texts = []
        for path in (self.out, self.err):
            texts.append(Path(path).read_text(encoding="utf-8", errors="replace") if os.path.exists(path) else "")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return texts

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _line(conn: socket.socket) -> str:
    """One line read byte by byte, so that nothing after it waits in a buffer where ``select`` cannot see it."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            raise OSError("the test fork server closed the connection")
        data += chunk
    return data.decode()


_SEQ = itertools.count()


class Client:
    """The pytest process's handle on one server, started on first use and stopped at exit."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="clipkit-prefork-")
        self.path = os.path.join(self.dir, "socket")
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.prefork", self.path], cwd=root, stdout=subprocess.PIPE, text=True
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the test fork server did not start")
        atexit.register(self.stop)

    def run(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        return self.start(args, env).wait(timeout)

    def start(self, args: list[str], env: dict, module: str = MAIN) -> Command:
        """Starts ``python -m MODULE ARGS`` (clipkit by default) in ``env`` and the current directory; its
        stdout and stderr go to files of their own, read back by ``Command.wait``."""
        n = next(_SEQ)
        out, err = (os.path.join(self.dir, f"{os.getpid()}-{n}-{name}") for name in ("out", "err"))
        request = {"args": list(args), "env": env, "cwd": os.getcwd(), "stdout": out, "stderr": err, "module": module}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        conn.sendall((json.dumps(request) + "\n").encode())
        pid = json.loads(_line(conn))["pid"]
        return Command(conn, pid, [sys.executable, "-m", module, *args], out, err)

    def shim(self) -> Path:
        """The folder holding the ``clipkit`` executable (see the module docstring), to put first on PATH; or
        its ``clipkit`` as a launcher's program (``torchrun --no-python``)."""
        folder = Path(self.dir) / "bin"
        exe = folder / MAIN
        if not exe.exists():
            folder.mkdir(exist_ok=True)
            exe.write_text(SHIM.format(python=sys.executable, socket=self.path))
            exe.chmod(0o755)
        return folder

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.connect(self.path)
                    conn.sendall(b'{"stop": true}\n')
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)  # (the socket, the shim)


_CLIENT: Client | None = None


def client() -> Client | None:
    """The running server, or None where it is switched off (CLIPKIT_TEST_PREFORK=0) or cannot fork."""
    global _CLIENT
    if os.environ.get("CLIPKIT_TEST_PREFORK", "1") == "0" or not hasattr(os, "fork"):
        return None
    if _CLIENT is None or _CLIENT.proc.poll() is not None:
        _CLIENT = Client()
    return _CLIENT


if __name__ == "__main__":
    serve(sys.argv[1])
