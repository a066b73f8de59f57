"""MLflow in a process of its own, so the pipeline's runs are written while it works.

Importing MLflow and opening its store take one to two seconds, and writing the runs, their
params, artifacts and the logged model as much again. The pipeline hands all of it to a
tracker process, started when the command starts, and goes on with the data: the work
overlaps on another core, and the pipeline waits only where it needs an answer (a run id for
a manifest, a model's URI).

    tracker = Tracker.start()               # python -m trainpipe.tracker: imports MLflow
    tracking = tracker.open(cfg)             # a tracking.Tracking, over there
    parent = tracking.start_pipeline(...)    # a Pending: the run id, once it is known
    tracking.record(parent, report)          # Pendings in arguments are resolved over there
    parent.result()                          # wait for the value here
    tracker.close()                          # wait for every call; the first error is raised

Calls run over there one at a time, in the order they were made. Errors come back as the
exception the call raised. The tracker ignores Ctrl-C and SIGTERM (they reach the whole
process group): this process decides what happens to the runs. When this process is gone
(killed, crashed), the tracker sees its end of the pipe close, ends the runs it started
KILLED and exits.
"""

import contextlib
import gc
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from trainpipe.errors import TrainpipeError
from trainpipe.warm import Forked, warm_fork


def _seconds(name: str, default: float) -> float:
    """A number of seconds from the environment; not a number (or negative): the default."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


# How long an interrupted run waits before it ends (marking runs KILLED on a server that
# no longer answers must not hang us): outputs already computed may publish within the
# first quarter, then the tracker has the rest to finish what it was given; one that has
# not is stopped (STOP_GRACE more if it does not unwind).
INTERRUPT_WAIT = _seconds("TRAINPIPE_INTERRUPT_WAIT", 20.0)
PUBLISH_GRACE = INTERRUPT_WAIT / 4
WAIT_AFTER_INTERRUPT = INTERRUPT_WAIT - PUBLISH_GRACE
STOP = signal.SIGUSR1  # "stop now": the tracker ignores SIGINT/SIGTERM, meant for the group
STOP_GRACE = 5.0  # seconds it has to unwind before it is killed


class Stopped(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """The pipeline's process told the tracker to stop."""


class TrackerLost(TrainpipeError):
    """The tracker process ended before it answered (killed, out of memory, crashed)."""

    exit_code = 1


@dataclass(frozen=True)
class Ref:
    """A call's result, named in a later call's arguments: resolved in the tracker."""

    call: int


class Pending:
    """The result of a call to the tracker, once it arrives."""

    def __init__(self, call: int):
        self.call = call
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.observed = False

    def _set(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError(f"the tracker did not answer within {timeout:.0f} s")
        self.observed = True
        if self._error is not None:
            raise self._error
        return self._value

    def __reduce__(self):  # sent as an argument: the tracker resolves it
        return (Ref, (self.call,))


class Tracker:
    """This process's end of the tracker: send calls, get Pendings back."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, log):
        self.proc, self.conn, self.log = proc, conn, log
        self._calls = 0
        self._pending: dict[int, Pending] = {}
        self._sent: list[Pending] = []
        self._lock = threading.Lock()
        self._lost: BaseException | None = None
        # Calls are sent by a thread of their own: a tracker stuck in a call stops reading,
        # and a big call (a model) then blocks on the full pipe. No caller may block there
        # too; a caller waits on its Pending, with the timeout it chooses.
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="trainpipe-tracker",
                                        daemon=True)
        self._writer = threading.Thread(target=self._write, name="trainpipe-tracker-send",
                                        daemon=True)
        self._reader.start()
        self._writer.start()

    @classmethod
    def start(cls) -> "Tracker":
        """Start the tracker process: forked by the warm tracker (MLflow imported already),
        else a new process that begins importing MLflow at once."""
        ours, theirs = socket.socketpair()
        log = tempfile.TemporaryFile()  # noqa: SIM115 - what it prints, for a crash report
        proc = warm_fork(theirs.fileno(), log.fileno())
        if proc is None:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trainpipe.tracker", str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        theirs.close()
        return cls(proc, Connection(ours.detach()), log)

    def open(self, cfg) -> "Remote":
        """A tracking.Tracking for `cfg`, in the tracker process."""
        from omegaconf import OmegaConf

        self.call("open", OmegaConf.to_container(cfg, resolve=True))
        return Remote(self)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Pending:
        with self._lock:
            if self._lost is not None:
                raise self._lost
            self._calls += 1
            pending = Pending(self._calls)
            self._pending[pending.call] = pending
            self._sent.append(pending)
            self._outbox.put(pickle.dumps((pending.call, method, args, kwargs),
                                          protocol=pickle.HIGHEST_PROTOCOL))
        return pending

    def raise_errors(self) -> None:
        """Raise the first error of a call whose result nobody waited for."""
        for pending in self._sent:
            if pending.done() and not pending.observed and pending._error is not None:
                pending.result()

    def close(self, timeout: float | None = None) -> None:
        """Wait for every call to finish, end the tracker, raise the first unseen error."""
        try:
            if self.proc.poll() is None and self._lost is None:
                self.call("close").result(timeout)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(STOP_GRACE)  # it exits as soon as it has answered
            self.raise_errors()
        finally:
            self.discard()

    def discard(self) -> None:
        """End the tracker now, whatever it is doing (nothing was asked of it, or it hangs):
        asked first (it unwinds, so a store it was creating leaves no temporary file), then
        killed."""
        if not self._sent and isinstance(self.proc, Forked):
            # Asked nothing (an up-to-date run): a forked tracker ends by itself when its pipe
            # closes, and the warm tracker collects it. Nothing to wait for.
            self.proc.forget()
        elif self.proc.poll() is None:
            self.proc.send_signal(STOP)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self._outbox.put(None)
        # shut down, not just closed: the reader thread, blocked in its recv, keeps the
        # socket open until it returns, and a tracker asked nothing waits for that end
        with (contextlib.suppress(OSError),
              socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as ours):
            ours.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.log.close()

    def _write(self) -> None:
        try:
            while (message := self._outbox.get()) is not None:
                self.conn.send_bytes(message)
        except (OSError, ValueError, TypeError) as exc:  # discard() closed the connection
            self._lose(exc)

    def _read(self) -> None:
        try:
            while True:
                call, value, error = pickle.loads(self.conn.recv_bytes())
                self._pending.pop(call)._set(value, error)
        except (EOFError, OSError, TypeError) as exc:  # TypeError: discard() closed it
            self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        """The tracker is gone: every call waiting for it, and every later one, fails."""
        with self._lock:
            if self._lost is None:
                self._lost = self._lost_error(exc)
            for pending in self._pending.values():
                pending._set(error=self._lost)
            self._pending.clear()

    def _lost_error(self, exc: BaseException) -> TrackerLost:
        try:  # a forked tracker's exit code comes from the warm tracker, a moment later
            code = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            code = None
        try:
            self.log.seek(0)
            tail = self.log.read()[-2000:].decode(errors="replace").strip()
        except (OSError, ValueError):
            tail = ""
        from trainpipe.redaction import redact_text

        how = f"exit code {code}" if code is not None else type(exc).__name__
        return TrackerLost(redact_text(f"the MLflow tracker process ended ({how})"
                                       + (f": {tail}" if tail else "")))


class Remote:
    """tracking.Tracking's methods, called in the tracker process; each returns a Pending."""

    def __init__(self, tracker: Tracker):
        self._tracker = tracker

    def __getattr__(self, method: str) -> Callable[..., Pending]:
        return lambda *args, **kwargs: self._tracker.call(method, *args, **kwargs)


# ------------------------------------------------------------------ the tracker process


def serve(fd: int, owner: int) -> None:
    """The tracker's loop: run each call on its Tracking, send back what it returned."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)

    def stop(signum, frame):
        raise Stopped

    signal.signal(STOP, stop)
    conn = Connection(fd)
    from trainpipe import tracking  # imports MLflow: the reason this process exists

    tracking.warm_up()
    # MLflow's modules are here to stay: the collector need not walk them again and again
    # (about a tenth of this process's time otherwise).
    gc.freeze()
    results: dict[int, Any] = {}
    current = None
    try:
        while True:
            try:
                call, method, args, kwargs = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the pipeline's process is gone (closed, reset):
                return _orphaned(current)
            value, error = None, None
            try:
                args = [_resolve(a, results) for a in args]
                kwargs = {k: _resolve(v, results) for k, v in kwargs.items()}
                if method == "open":
                    from omegaconf import OmegaConf

                    current = tracking.Tracking(OmegaConf.create(args[0]), pid=owner)
                    tracking.warm_up_model(current.cfg)
                elif method == "close":
                    conn.send_bytes(pickle.dumps((call, None, None)))
                    _exit_now()
                else:
                    with tracking.store_errors(current.uri):  # a full disk, in words
                        value = getattr(current, method)(*args, **kwargs)
            except Stopped:
                raise
            except BaseException as exc:  # noqa: BLE001 - sent back to be raised there
                error = exc
            results[call] = value
            try:
                conn.send_bytes(_dumps(call, value, error))
            except OSError:  # gone while we worked
                return _orphaned(current)
    finally:
        conn.close()


def _exit_now() -> None:
    """Every call is done and answered: exit without the interpreter's teardown of MLflow,
    SQLAlchemy and scikit-learn (about a second the pipeline would wait for)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _orphaned(current) -> None:
    """The pipeline's process is gone: nobody else will end the runs it started."""
    if current is not None:
        current.end_open_runs("KILLED")


def _resolve(value: Any, results: dict[int, Any]) -> Any:
    return results[value.call] if isinstance(value, Ref) else value


def _dumps(call: int, value: Any, error: BaseException | None) -> bytes:
    try:
        return pickle.dumps((call, value, error), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: send its words
        from trainpipe.redaction import redact_text

        text = redact_text(f"{type(error).__name__}: {error}")
        return pickle.dumps((call, None, TrainpipeError(text)))


if __name__ == "__main__":
    from trainpipe.tracker import Stopped as StoppedHere
    from trainpipe.tracker import serve as serve_here  # not __main__'s copy: Ref must match

    try:
        serve_here(int(sys.argv[1]), int(sys.argv[2]))
    except StoppedHere:
        sys.exit(1)
