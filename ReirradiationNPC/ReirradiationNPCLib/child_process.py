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

Only where fork is safe (:func:`available`): Linux. Not Windows (no fork) and not macOS (forking a process that has
loaded system frameworks is unsafe); never call it inside Slicer (a Qt application): the engine's callers decide
(the command line does; the Slicer module does not).
"""

from __future__ import annotations

import os
import pickle
import select
import sys
import tempfile
import time
from collections.abc import Callable


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
        if inbox:
            in_r, in_w = os.pipe()
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
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
        """End the child at once (nothing more is wanted of it) and reap it."""
        if self._done:
            return
        self.close_inbox()
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        os.close(self._from_child)
        os.waitpid(self.pid, 0)
        self._done = True

    def result(self, timeout: float | None = None):
        """Wait for the child and return its value; ChildError if it raised, ended without a result or took longer
        than ``timeout`` seconds (it is then killed)."""
        if self._done:
            return self._value
        self.close_inbox()
        chunks = []
        end = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = None if end is None else max(0.0, end - time.monotonic())
                ready, _, _ = select.select([self._from_child], [], [], wait)
                if not ready:
                    os.kill(self.pid, 9)
                    raise ChildError(f"the child process did not finish within {timeout:g} s", kind="timeout")
                data = os.read(self._from_child, 1 << 20)
                if not data:
                    break
                chunks.append(data)
        finally:
            os.close(self._from_child)
            _, status = os.waitpid(self.pid, 0)
            self._done = True
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
