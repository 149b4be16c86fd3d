"""``reirradiation-npc review RESULTS_DIR --per-viewer``: each browser gets its own review server, so that each
viewer's camera, slice positions, selected row and wash are their own.

trame-slicer renders one set of views per server and streams the same pictures to every connected browser
(docs/review.md, "Several browsers on one server"). This launcher (Python standard library only) answers on the
given port; every visit of ``/`` starts a new ``reirradiation-npc review`` process on a free local port (same results
folder, same interface) and sends the browser there once it answers (a small waiting page meanwhile). Each server
loads the scene itself: about 20 s and 0.8 GB of memory per viewer on the demo, hence ``max_viewers``.

A viewer's server stops by itself when no browser has been connected to it for ``idle_stop_s`` seconds (its tab
closed, or the browser sent to ``/`` again): the launcher then frees its slot and says so in one line. A viewer
whose server fails (exits before it answers, or does not answer within :data:`START_TIMEOUT_S`) is named in one
line with the last line of its error output; its last :data:`STDERR_LINES` lines are shown on its page in the
browser and logged (``--verbose``). Ctrl-C (or SIGTERM) stops the launcher and every server it started. Nothing is
written into the results folder.
"""

from __future__ import annotations

import collections
import html
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .stop_signals import sigterm_as_ctrl_c

log = logging.getLogger(__name__)

#: seconds a viewer's server may take to answer before the launcher gives up on it (and stops it)
START_TIMEOUT_S = 180.0
#: a viewer's server stops after this many seconds without a connected browser (``review --idle-stop``)
VIEWER_IDLE_STOP_S = 120
#: lines of a viewer's error output (stderr) kept to say why it failed
STDERR_LINES = 20
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")   # VTK's coloured warnings


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


class Viewer:
    """One browser's own review server (a subprocess); the last lines of its stderr are kept (``stderr_tail``)."""

    def __init__(self, number: int, results_dir: Path, host: str, command: list, idle_stop_s: int = 0):
        self.number = number
        self.port = free_port(host)
        self.host = host
        self.started = time.monotonic()
        self.ready = False
        self.failed = ""
        self.ended = False          # its process has ended and the launcher has counted it out (slot free)
        self.stderr_tail: collections.deque = collections.deque(maxlen=STDERR_LINES)
        args = ["review", str(results_dir), "--port", str(self.port), "--host", host]
        if idle_stop_s:
            args += ["--idle-stop", str(int(idle_stop_s))]
        self.proc = subprocess.Popen(command + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        # read stderr as it comes (a pipe left unread would block the server once full); keep the last lines
        self._reader = threading.Thread(target=self._read_stderr, name=f"viewer-{number}-stderr", daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        with self.proc.stderr:
            for raw in self.proc.stderr:
                line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
                if line.strip():
                    self.stderr_tail.append(line)

    def last_lines(self) -> list:
        """The kept stderr lines (all of them once the process has ended and its output is read)."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=5)
        return list(self.stderr_tail)

    def check(self) -> None:
        """Update ``ready``/``failed`` (the server answers HTTP 200 / exited with an error / too slow: then it is
        stopped). A server that ended with code 0 stopped cleanly (no browser any more, or told to): not failed."""
        if self.ready or self.failed:
            return
        if self.proc.poll() is not None:
            if self.proc.returncode != 0:
                self.failed = f"its server exited (code {self.proc.returncode}) before it answered"
            return
        local = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        try:
            with urllib.request.urlopen(f"http://{local}:{self.port}/", timeout=2) as r:
                self.ready = r.status == 200
        except OSError:
            if time.monotonic() - self.started > START_TIMEOUT_S:
                self.failed = f"its server did not answer within {START_TIMEOUT_S:.0f} s (stopped)"
                threading.Thread(target=self.stop, daemon=True).start()   # frees its slot once it has ended

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the server's own clean stop (Ctrl-C)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


class Launcher:
    """The launcher's state: the viewers it started."""

    def __init__(self, results_dir: Path, host: str, max_viewers: int, command: list | None = None,
                 idle_stop_s: int = VIEWER_IDLE_STOP_S, echo=print):
        self.results_dir = Path(results_dir)
        self.host = host
        self.max_viewers = max_viewers
        self.command = command or [sys.executable, "-m", "ReirradiationNPCLib.cli"]
        self.idle_stop_s = int(idle_stop_s)
        self.echo = echo
        self.viewers: dict = {}
        self.lock = threading.Lock()
        self.stopping = False

    def running(self) -> int:
        """Viewers whose server has not ended (the slots in use)."""
        return sum(1 for v in self.viewers.values() if not v.ended)

    def reap(self) -> None:
        """Count out every viewer whose server has ended (its slot is free again), with one line each: why it
        failed (the last line of its stderr; the last lines are logged), or that it stopped without a browser."""
        with self.lock:
            ended = [v for v in self.viewers.values() if not v.ended and v.proc.poll() is not None]
            for v in ended:
                v.ended = True
            running = self.running()
        if self.stopping:
            return
        for v in ended:
            v.check()
            lines = v.last_lines()
            code = v.proc.returncode
            if code == 0 and not v.failed:
                why = f" (no browser connected for {self.idle_stop_s} s)" if self.idle_stop_s else ""
                self.echo(f"viewer {v.number} (port {v.port}): its server stopped{why}; {running} of "
                          f"{self.max_viewers} viewers running")
                continue
            why = v.failed or f"its server exited (code {code})"
            last = lines[-1] if lines else "no error output"
            self.echo(f"viewer {v.number} (port {v.port}) failed: {why}: {last}; "
                      f"{running} of {self.max_viewers} viewers running")
            if lines:
                log.info("viewer %d's server, last %d lines of its error output:\n%s", v.number, len(lines),
                         "\n".join(lines))

    def new_viewer(self):
        self.reap()
        with self.lock:
            if self.running() >= self.max_viewers:
                return None
            number = len(self.viewers) + 1
            viewer = Viewer(number, self.results_dir, self.host, self.command, self.idle_stop_s)
            self.viewers[number] = viewer
            return viewer

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            viewers = list(self.viewers.values())
        for v in viewers:
            v.stop()


def _page(title: str, body: str, refresh: bool = False) -> bytes:
    meta = '<meta http-equiv="refresh" content="2">' if refresh else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(title)}</title></head>"
            f"<body style='font-family: sans-serif; margin: 2em;'><h3>{html.escape(title)}</h3>{body}</body></html>"
            ).encode("utf-8")


def _handler(launcher: Launcher):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the launcher prints its own lines
            pass

        def _send(self, code: int, content: bytes, location: str | None = None) -> None:
            self.send_response(code)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(content)

        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path == "/":
                viewer = launcher.new_viewer()
                if viewer is None:
                    self._send(503, _page("ReirradiationNPC review: no free viewer",
                                          f"<p>{launcher.max_viewers} viewers are open (each has its own server). "
                                          "Close one, or ask whoever started the review to allow more "
                                          "(--max-viewers).</p>"))
                    return
                self._send(303, _page("ReirradiationNPC review", "<p>starting…</p>"), f"/viewer/{viewer.number}")
                return
            if path.startswith("/viewer/"):
                try:
                    viewer = launcher.viewers[int(path.rsplit("/", 1)[1])]
                except (ValueError, KeyError):
                    self._send(404, _page("ReirradiationNPC review", "<p>no such viewer; open / again</p>"))
                    return
                viewer.check()
                if viewer.failed:
                    lines = viewer.last_lines()
                    tail = ("<p>The last lines of its error output:</p><pre id='viewer-stderr'>"
                            + html.escape("\n".join(lines)) + "</pre>") if lines else "<p>No error output.</p>"
                    self._send(500, _page("ReirradiationNPC review: the viewer did not start",
                                          f"<p>Viewer {viewer.number}: {html.escape(viewer.failed)}.</p>{tail}"
                                          "<p>Open / again for a new viewer.</p>"))
                elif viewer.proc.poll() is not None:
                    why = (f" (no browser connected for {launcher.idle_stop_s} s)" if launcher.idle_stop_s
                           else "")
                    self._send(410, _page("ReirradiationNPC review: this viewer has stopped",
                                          f"<p>Viewer {viewer.number}'s server stopped{why}. Open / for a new "
                                          "viewer.</p>"))
                elif viewer.ready:
                    name = (self.headers.get("Host") or f"127.0.0.1:{viewer.port}").rsplit(":", 1)[0]
                    self._send(302, _page("ReirradiationNPC review", "<p>ready</p>"),
                               f"http://{name}:{viewer.port}/")
                else:
                    waited = time.monotonic() - viewer.started
                    self._send(200, _page("ReirradiationNPC review",
                                          f"<p id='starting'>Starting your own review view (its own server, "
                                          f"about 20 s): {waited:.0f} s…</p>", refresh=True))
                return
            self._send(404, _page("ReirradiationNPC review", "<p>not found; open / </p>"))

    return Handler


class _LauncherServer(ThreadingHTTPServer):
    """The launcher's HTTP server; between requests (every poll interval) it counts out ended viewers."""

    daemon_threads = True
    launcher: Launcher | None = None

    def service_actions(self) -> None:
        if self.launcher is not None:
            self.launcher.reap()


def serve_per_viewer(results_dir, port: int = 8080, host: str = "127.0.0.1", max_viewers: int = 4,
                     echo=print, command: list | None = None, idle_stop_s: int = VIEWER_IDLE_STOP_S) -> None:
    """Serve the launcher until interrupted (Ctrl-C or SIGTERM); stops every viewer's server on the way out. Each
    viewer's server stops by itself ``idle_stop_s`` seconds after its browser left (0: never)."""
    launcher = Launcher(Path(results_dir), host, max_viewers, command, idle_stop_s=idle_stop_s, echo=echo)
    httpd = _LauncherServer((host, port), _handler(launcher))
    httpd.launcher = launcher

    echo(f"review of {Path(results_dir)}: one server per viewer (at most {max_viewers}) from "
         f"http://{host}:{port}/  (Ctrl-C stops)")
    try:
        with sigterm_as_ctrl_c():
            httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        launcher.stop_all()
    echo(f"review stopped ({len(launcher.viewers)} viewer server(s) started and stopped)")
