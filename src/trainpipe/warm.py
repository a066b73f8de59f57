"""The warm tracker: one process that has imported MLflow, its store's code and the model
libraries once, and forks a tracker for each run.

A tracker started from scratch spends about three seconds of CPU importing MLflow,
SQLAlchemy and scikit-learn before it records anything, on a machine where the run itself
needs both cores. A tracker forked from the warm tracker starts with all of it loaded.

    proc = warm_fork(fd, log_fd)    # a Popen-like handle, or None: start a tracker yourself

The first run starts the warm tracker and its tracker is the first one forked (no work is
done twice). It lives while runs come: it exits after TRAINPIPE_WARM_TRACKER seconds with
no run (default 600; 0 turns it off: every run starts its own tracker). There is one per
user, Python and installed code: its socket is in $XDG_RUNTIME_DIR (else the temp folder)
under trainpipe-<uid>/, named by a digest of the interpreter, PYTHONPATH, the installed
packages' folders and trainpipe's own files, so an edit or an install gets a new one.

A forked tracker is not the run's child: its exit code comes from the warm tracker (its
parent), and it is signalled through a pidfd, which cannot reach a reused pid. It gets
the run's environment, working folder and output file with the request.
"""

import fcntl
import gc
import hashlib
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

IDLE_SECONDS = 600.0
ENV = "TRAINPIPE_WARM_TRACKER"
CODE = struct.Struct("!i")  # the warm tracker's answers: the pid, then the exit code
STALE_CHECK = 30.0  # how often an idle warm tracker checks that its code is current
CONNECT_WAIT = 5.0  # how long another starting warm tracker may take to listen


def idle_seconds() -> float:
    """TRAINPIPE_WARM_TRACKER: seconds; unset, the default; 0 or a word (off, no): off."""
    value = os.environ.get(ENV, "").strip()
    try:
        return max(0.0, float(value)) if value else IDLE_SECONDS
    except ValueError:
        return 0.0


def address() -> Path | None:
    """The warm tracker's socket for this Python and code; None when there is no private
    folder for it (another user owns the name, or the folder cannot be made)."""
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / (
        f"trainpipe-{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    where = folder / f"tracker-{code_digest()}.sock"
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or len(bytes(where)) > 100:
        return None  # not ours alone, or too long a name for a socket (108 bytes at most)
    return where


def code_digest() -> str:
    """What a warm tracker has loaded: the interpreter, its import path, the installed
    packages (a folder's mtime changes when a package in it is installed or removed) and
    trainpipe's own files (size and mtime)."""
    import site

    digest = hashlib.sha256(f"{sys.executable}\0{os.environ.get('PYTHONPATH', '')}".encode())
    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        with suppress(OSError):
            digest.update(f"\0{folder}\0{os.stat(folder).st_mtime_ns}".encode())
    for path in sorted(Path(__file__).parent.rglob("*")):
        with suppress(OSError):
            info = path.stat()
            digest.update(f"\0{path}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------ the run's side


def warm_fork(fd: int, log_fd: int) -> "Forked | None":
    """Ask the warm tracker (started if there is none) to fork a tracker that serves `fd`
    and writes to `log_fd`; None when it is turned off or cannot be reached."""
    where = address() if idle_seconds() > 0 and hasattr(os, "pidfd_open") else None
    if where is None:
        return None
    sock, started = _connect(where), None
    if sock is None:
        started = subprocess.run([sys.executable, "-m", "trainpipe.warm", str(where),
                                  str(idle_seconds())], cwd="/", stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if started.returncode != 0:
            return None
        deadline = time.monotonic() + CONNECT_WAIT
        while sock is None and time.monotonic() < deadline:
            time.sleep(0.01)
            sock = _connect(where)
        if sock is None:
            return None
    request = pickle.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "owner": os.getpid()})
    try:
        socket.send_fds(sock, [CODE.pack(len(request)) + request], [fd, log_fd])
    except OSError:
        sock.close()
        return None
    return Forked(sock, started_warm_tracker=started is not None)


def _connect(where: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(where))
    except OSError:
        sock.close()
        return None
    return sock


class Forked:
    """subprocess.Popen's poll, wait, send_signal and kill for a tracker the warm tracker
    forked. Its pid arrives once the warm tracker has forked it (after its imports, for
    the first run), its exit code when it has ended."""

    def __init__(self, sock: socket.socket, started_warm_tracker: bool = False):
        self.sock = sock
        self.started_warm_tracker = started_warm_tracker  # this run started the warm tracker
        self.pid: int | None = None
        self.returncode: int | None = None
        self._pidfd: int | None = None
        self._buffer = b""
        self._lock = threading.Lock()
        sock.setblocking(False)

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("tracker", timeout or 0)
            self._read(left)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        if self.pid is None:
            # Not forked yet (the warm tracker is still importing): withdraw the request.
            # If it is forked all the same, it finds its pipe closed and exits.
            with self._lock:
                if self.returncode is None:
                    self._end(-sig)
            return
        if self._pidfd is not None:
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def forget(self) -> None:
        """Stop watching it (it ends by itself once its pipe closes): returncode 0."""
        with self._lock:
            if self.returncode is None:
                self._end(0)

    def _read(self, timeout: float | None) -> None:
        """Take in what the warm tracker said within `timeout`: the pid, the exit code.
        If the warm tracker is gone, the pidfd tells when the tracker has ended. Called
        by the run's threads at once (the tracker's reader polls when its pipe closes)."""
        with self._lock:
            if self.returncode is not None:
                return
            watched = self.sock if self.sock.fileno() >= 0 else self._pidfd
        try:
            if not select.select([watched], [], [], timeout)[0]:
                return
        except (OSError, ValueError):  # another thread closed it meanwhile: look again
            return
        with self._lock:
            if self.returncode is not None:
                return
            if watched is self._pidfd:  # ended, and the warm tracker that knew how is gone
                self._end(-1)
                return
            try:
                data = self.sock.recv(64)
            except BlockingIOError:  # another thread took it
                return
            except OSError:
                data = b""
            if not data:  # the warm tracker is gone
                self.sock.close()
                if self._pidfd is None:
                    self._end(-1)
                return
            self._buffer += data
            while len(self._buffer) >= CODE.size and self.returncode is None:
                (value,) = CODE.unpack(self._buffer[:CODE.size])
                self._buffer = self._buffer[CODE.size:]
                if self.pid is None:
                    self.pid = value
                    with suppress(ProcessLookupError):  # already ended: the code follows
                        self._pidfd = os.pidfd_open(value)
                else:
                    self._end(value)

    def _end(self, code: int) -> None:
        self.returncode = code
        self.sock.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


# ------------------------------------------------------------------ the warm tracker


def serve(where: Path, idle: float, ready: int) -> None:
    """Listen at `where` (then write to the fd `ready`), import what trackers need, fork
    one per request; exit after `idle` seconds with no request and no tracker alive."""
    lock = _locked(where.with_suffix(".lock"))  # held for life
    if lock is None:
        os.write(ready, b"1")  # another warm tracker for this code is starting or serving
        return
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    with open(where.with_suffix(".log"), "w") as log:  # what went wrong, if anything did
        os.dup2(log.fileno(), 2)
    with suppress(FileNotFoundError):
        where.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(where))
    listener.listen(64)
    bound = os.stat(where).st_ino
    os.write(ready, b"1")
    os.close(ready)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # takes its socket along
    _import_everything()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    trackers: dict[int, socket.socket] = {}
    last = time.monotonic()
    try:
        while trackers or time.monotonic() - last < idle:
            timeout = None if trackers else min(STALE_CHECK, idle - (time.monotonic() - last))
            events = selector.select(timeout)
            if not events and not trackers and where.name != f"tracker-{code_digest()}.sock":
                # trainpipe or a package was changed: later runs use a new one. Only when
                # idle: a run that connected before the change is served, not dropped.
                break
            for key, _ in events:
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _fork(conn, [listener.fileno(), wake_r, wake_w, lock.fileno(),
                                       *(c.fileno() for c in trackers.values())])
                    if pid is not None:
                        trackers[pid] = conn
                    last = time.monotonic()
                else:
                    with suppress(BlockingIOError):
                        os.read(wake_r, 512)
            last = _reap(trackers) or last
    finally:
        with suppress(OSError):
            if os.stat(where).st_ino == bound:  # not a newer warm tracker's
                where.unlink()
        lock.truncate(0)  # its pid, once it has ended, could be another process's
        _clear(where, lock)


def _locked(path: Path):
    """`path` opened and locked, or None when another warm tracker holds it. A lock file
    that an ending warm tracker removed between our open and our lock is opened again."""
    for _ in range(3):
        lock = open(path, "a")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return None
        if _is_at(path, lock):
            return lock
        lock.close()
    return None


def _is_at(path: Path, file) -> bool:
    """Whether the open `file` is the one at `path` (not one removed, or replaced, since)."""
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except OSError:
        return False


def _clear(where: Path, lock) -> None:
    """Leave no files behind: the .lock, removed while it is still held (a warm tracker
    starting meanwhile finds it gone and makes a new one), and the .log if empty (nothing
    went wrong). Only while the .lock is still ours: then so is the .log."""
    if not _is_at(where.with_suffix(".lock"), lock):
        return
    with suppress(OSError):
        log = where.with_suffix(".log")
        if log.stat().st_size == 0:
            log.unlink()
        where.with_suffix(".lock").unlink()


def _import_everything() -> None:
    """What any tracker may need: MLflow and its store's tables, the model libraries, what
    logging a model and the report load. A failure here shows in each tracker's own import."""
    with suppress(Exception):
        import sqlalchemy.orm

        from trainpipe import report, tracker, tracking  # noqa: F401

        tracking.warm_up().join()
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        import sklearn.ensemble  # noqa: F401
        import sklearn.linear_model  # noqa: F401

        sqlalchemy.orm.configure_mappers()
        with suppress(Exception):
            import lightgbm  # noqa: F401
    gc.freeze()  # the children share these pages; the collector need not walk them


def _fork(conn: socket.socket, close: list[int]) -> int | None:
    """Fork a tracker for the request on `conn`; its pid, None for a request withdrawn or
    refused."""
    request, fds = _request(conn)
    if request is None:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    pid = os.fork()
    if pid == 0:
        _become_tracker(request, *fds, [*close, conn.fileno()])
    for fd in fds:
        os.close(fd)
    with suppress(OSError):  # the run withdrew: its tracker finds the pipe closed and exits
        conn.sendall(CODE.pack(pid))
    return pid


def _request(conn: socket.socket) -> tuple[dict | None, list[int]]:
    """The run's request on `conn` and the two descriptors it sent (its pipe, its log).
    None when withdrawn (the run ended before its tracker was forked: an up-to-date run,
    nothing wrong) or refused, which the warm tracker's .log says (kept when not empty)."""
    conn.settimeout(5)
    fds: list[int] = []
    try:
        peer_uid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        (size,) = CODE.unpack(data[:CODE.size])
        data = data[CODE.size:]
        while len(data) < size and (more := conn.recv(1 << 20)):
            data += more
        if len(data) != size or len(fds) != 2 or peer_uid != os.getuid():
            raise ValueError(f"{len(data)} of {size} bytes, {len(fds)} descriptors, from "
                             f"uid {peer_uid}")
        request = pickle.loads(data)
        conn.setblocking(False)
        with suppress(BlockingIOError):
            if conn.recv(1, socket.MSG_PEEK) == b"":
                return None, fds  # withdrawn
        conn.setblocking(True)
        return request, fds
    except (OSError, ValueError, struct.error, pickle.UnpicklingError) as exc:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} a request was refused: {exc!r}",
              file=sys.stderr, flush=True)
        return None, fds


def _become_tracker(request: dict, fd: int, log_fd: int, close: list[int]) -> None:
    """In the forked child: take on the run's environment and folder, serve it, exit."""
    code = 1  # as a started tracker told to stop, or failing
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for other in close:
            with suppress(OSError):
                os.close(other)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]  # as `python -m` from the run's folder would have it
        tempfile.tempdir = None
        from trainpipe import report, tracker

        report._default_params.cache_clear()  # the defaults read the run's environment
        with suppress(tracker.Stopped):
            tracker.serve(fd, request["owner"])
            code = 0
    except BaseException:  # noqa: BLE001 - told in the run's log, as a started tracker would
        import traceback

        traceback.print_exc()
    finally:
        with suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(trackers: dict[int, socket.socket]) -> float | None:
    """Tell each run whose tracker ended its exit code; when the last one ended, if any."""
    ended = None
    while trackers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        conn = trackers.pop(pid, None)
        if conn is not None:
            with suppress(OSError):
                conn.sendall(CODE.pack(os.waitstatus_to_exitcode(status)))
            conn.close()
        ended = time.monotonic()
    return ended


if __name__ == "__main__":
    # Detached from the run that starts it: a session of its own, not its child.
    # It says when it listens (or another does): the run that starts it waits for that only.
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        os.close(ready_r)
        os.setsid()
        serve(Path(sys.argv[1]), float(sys.argv[2]), ready_w)
        os._exit(0)
    os.close(ready_w)
    os._exit(0 if os.read(ready_r, 1) else 1)
