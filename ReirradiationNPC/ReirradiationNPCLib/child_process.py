"""Run a function in a forked child process and get its return value back (issue 15: work beside other work).

The one helper for "run this in a child process" (the Slicer scene beside the report, the report's figures beside
the run). :class:`Child` forks; the child runs ``fn(*args)`` on a copy of the parent's memory (nothing is pickled on
the way in, nothing computed again), sends back the pickled return value, or its error as text, through a pipe and
ends with ``os._exit`` (it never returns into the caller's code, runs no atexit handler and flushes none of the
parent's buffers). ``result()`` waits for it and returns the value or raises :class:`ChildError`.

A child started with ``inbox=True`` can be given objects later (:meth:`Child.send`): it reads them, in order, with
the ``inbox`` callable passed as its first argument. Each object goes through a temporary file, so ``send`` never
waits for the child (a pipe of 64 kB would block the parent until the child reads); ``inbox()`` returns None once
the parent has ended or closed the inbox and nothing more is to be read. A process the child forks after reading
some objects can read the next ones (it gets a copy of the inbox, read position included).

Nothing is left behind: a child forked by the command leads a process group of its own, which the processes it
forks join (a forked child starts no group); :meth:`Child.kill`, a timeout and an interrupt while waiting end the
whole group with SIGKILL, and every object sent that the child did not read is removed from the temporary folder
when the child is reaped. Because of its own group, the terminal's Ctrl-C reaches the parent only: the parent's
way out (``kill``, ``result``) ends the children.

Only where fork is safe (:func:`available`): Linux. Not Windows (no fork) and not macOS (forking a process that has
loaded system frameworks is unsafe); never call it inside Slicer (a Qt application): the engine's callers decide
(the command line does; the Slicer module does not).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable


#: True in a process forked by :class:`Child`: the children it forks stay in its process group
_IN_CHILD = False


def _mark_in_child() -> None:
    global _IN_CHILD
    _IN_CHILD = True


def available() -> bool:
    """Whether :class:`Child` can run here: Linux with ``os.fork``."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class ChildError(Exception):
    """The child process raised (``kind`` is its exception type's name; ``input_error`` True for an InputError)
    or ended without a result."""

    def __init__(self, message: str, kind: str = "", input_error: bool = False):
        super().__init__(message)
        self.kind = kind
        self.input_error = input_error


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Child:
    """``fn(*args)`` (``fn(inbox, *args)`` with ``inbox=True``) in a forked child process."""

    def __init__(self, fn: Callable, *args, inbox: bool = False):
        self._done = False
        self._value = None
        self._to_child = None
        self._unread: list[str] = []   # files sent; those the child has not read are removed when it is reaped
        # the command's children lead a process group of their own (their own children join it): killed as one
        self._group = not _IN_CHILD
        fds: list[int] = []
        try:
            if inbox:
                in_r, in_w = os.pipe()
                fds += [in_r, in_w]
            r, w = os.pipe()
            fds += [r, w]
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
        except BaseException:    # e.g. OSError ENOMEM / EAGAIN: no child, nothing left open
            for fd in fds:
                os.close(fd)
            raise
        if pid == 0:  # the child: never returns into the caller's code
            _mark_in_child()
            code = 1
            try:
                if self._group:
                    os.setpgid(0, 0)
                os.close(r)
                if inbox:
                    os.close(in_w)
                    value = fn(_Inbox(in_r), *args)
                else:
                    value = fn(*args)
                payload = pickle.dumps(("ok", value), protocol=pickle.HIGHEST_PROTOCOL)
                code = 0
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
                from .errors import InputError
                payload = pickle.dumps(("error", type(exc).__name__, str(exc), isinstance(exc, InputError)))
            try:
                _write_all(w, payload)
                os.close(w)
            finally:
                os._exit(code)
        if self._group:   # in the parent too (whichever runs first), so that a kill at once reaches the group
            try:
                os.setpgid(pid, pid)
            except OSError:   # the child did it already, or has ended
                pass
        os.close(w)
        self.pid = pid
        self._from_child = r
        if inbox:
            os.close(in_r)
            self._to_child = in_w

    def send(self, obj, last: bool = True) -> None:
        """Give the child (started with ``inbox=True``) an object; returns at once (the object is pickled into a
        temporary file that the child reads and removes). ``last``: nothing more will be sent (the inbox is
        closed)."""
        try:
            fd, path = tempfile.mkstemp(prefix="reirradiation-npc-child-", suffix=".pickle")
            try:
                with os.fdopen(fd, "wb") as fh:
                    pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
                _write_all(self._to_child, path.encode("utf-8") + b"\n")
            except BaseException:
                os.unlink(path)
                raise
            self._unread.append(path)
        except BaseException:
            self.close_inbox()
            raise
        if last:
            self.close_inbox()

    def close_inbox(self) -> None:
        """Nothing (more) will be sent: the child's ``inbox()`` returns None if it has not read anything."""
        if self._to_child is not None:
            try:
                os.close(self._to_child)
            finally:
                self._to_child = None

    def kill(self) -> None:
        """End the child and every process it started at once (nothing more is wanted of them), reap it and remove
        what it was sent and did not read."""
        if self._done:
            return
        self.close_inbox()
        self._end_all()
        os.close(self._from_child)
        self._reap()

    def _end_all(self) -> None:
        """SIGKILL to the child's process group (the child and what it forked), before the child is reaped (its
        pid, hence the group's id, is then still ours)."""
        if self._group:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:   # no such group (both setpgid calls failed?): the child itself below
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self) -> int:
        """Wait for the ended child, remove the files it was sent and did not read; returns its wait status."""
        try:
            _, status = os.waitpid(self.pid, 0)
        finally:
            self._done = True
            for path in self._unread:
                try:
                    os.unlink(path)
                except FileNotFoundError:   # read (and removed) by the child
                    pass
            self._unread = []
        return status

    def result(self, timeout: float | None = None):
        """Wait for the child and return its value; ChildError if it raised, ended without a result or took longer
        than ``timeout`` seconds (it is then killed, with what it started). Interrupted while waiting (Ctrl-C):
        the child is killed too."""
        if self._done:
            return self._value
        self.close_inbox()
        chunks = []
        end = None if timeout is None else time.monotonic() + timeout
        ended = False
        try:
            while True:
                wait = None if end is None else max(0.0, end - time.monotonic())
                ready, _, _ = select.select([self._from_child], [], [], wait)
                if not ready:
                    raise ChildError(f"the child process did not finish within {timeout:g} s", kind="timeout")
                data = os.read(self._from_child, 1 << 20)
                if not data:
                    break
                chunks.append(data)
            ended = True
        finally:
            if not ended:   # timeout, or interrupted while waiting: nothing more is wanted of it
                self._end_all()
            os.close(self._from_child)
            status = self._reap()
        raw = b"".join(chunks)
        if not raw:
            raise ChildError(f"the child process ended without a result (wait status {status})", kind="died")
        msg = pickle.loads(raw)
        if msg[0] == "error":
            raise ChildError(f"{msg[1]}: {msg[2]}", kind=msg[1], input_error=msg[3])
        self._value = msg[1]
        return self._value


class _Inbox:
    """The child's end of :meth:`Child.send`: ``inbox()`` blocks until the parent sends (the next object) or
    closes the child's inbox / ends (None)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._buf = b""

    def __call__(self):
        # one line (a file name) per object: read up to a line's end, not to the pipe's end (a process forked
        # later by the parent may hold a copy of the pipe's write end)
        while b"\n" not in self._buf and self._fd is not None:
            data = os.read(self._fd, 4096)
            if not data:
                os.close(self._fd)
                self._fd = None
                break
            self._buf += data
        line, sep, self._buf = self._buf.partition(b"\n")
        path = line.decode("utf-8").strip()
        if not sep or not path:
            return None
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh)
        finally:
            os.unlink(path)
