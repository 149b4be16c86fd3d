"""``reirradiation-npc review RESULTS_DIR --per-viewer``: each browser gets its own review server, so that each
viewer's camera, slice positions, selected row and wash are their own.

trame-slicer renders one set of views per server and streams the same pictures to every connected browser
(docs/review.md, "Several browsers on one server"). This launcher (Python standard library only) answers on the
given port; every visit of ``/`` starts a new ``reirradiation-npc review`` process on a free local port (same results
folder, same interface) and sends the browser there once it answers (a small waiting page meanwhile). Each server
loads the scene itself: about 20 s and 0.8 GB of memory per viewer on the demo, hence ``max_viewers``. Ctrl-C
stops the launcher and every server it started. Nothing is written into the results folder.
"""

from __future__ import annotations

import html
import os
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

#: seconds a viewer's server may take to answer before the launcher gives up on it
START_TIMEOUT_S = 180.0


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


class Viewer:
    """One browser's own review server (a subprocess)."""

    def __init__(self, number: int, results_dir: Path, host: str, command: list):
        self.number = number
        self.port = free_port(host)
        self.host = host
        self.started = time.monotonic()
        self.ready = False
        self.failed = ""
        self.proc = subprocess.Popen(command + ["review", str(results_dir), "--port", str(self.port),
                                                "--host", host],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def check(self) -> None:
        """Update ``ready``/``failed`` (the server answers HTTP 200 / exited / too slow)."""
        if self.ready or self.failed:
            return
        if self.proc.poll() is not None:
            self.failed = f"its server exited (code {self.proc.returncode})"
            return
        local = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        try:
            with urllib.request.urlopen(f"http://{local}:{self.port}/", timeout=2) as r:
                self.ready = r.status == 200
        except OSError:
            if time.monotonic() - self.started > START_TIMEOUT_S:
                self.failed = f"its server did not answer within {START_TIMEOUT_S:.0f} s"

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

    def __init__(self, results_dir: Path, host: str, max_viewers: int, command: list | None = None):
        self.results_dir = Path(results_dir)
        self.host = host
        self.max_viewers = max_viewers
        self.command = command or [sys.executable, "-m", "ReirradiationNPCLib.cli"]
        self.viewers: dict = {}
        self.lock = threading.Lock()

    def new_viewer(self):
        with self.lock:
            alive = [v for v in self.viewers.values() if v.proc.poll() is None]
            if len(alive) >= self.max_viewers:
                return None
            number = len(self.viewers) + 1
            viewer = Viewer(number, self.results_dir, self.host, self.command)
            self.viewers[number] = viewer
            return viewer

    def stop_all(self) -> None:
        with self.lock:
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
                if viewer.ready:
                    name = (self.headers.get("Host") or f"127.0.0.1:{viewer.port}").rsplit(":", 1)[0]
                    self._send(302, _page("ReirradiationNPC review", "<p>ready</p>"),
                               f"http://{name}:{viewer.port}/")
                elif viewer.failed:
                    self._send(500, _page("ReirradiationNPC review: the viewer did not start",
                                          f"<p>{html.escape(viewer.failed)}.</p>"))
                else:
                    waited = time.monotonic() - viewer.started
                    self._send(200, _page("ReirradiationNPC review",
                                          f"<p id='starting'>Starting your own review view (its own server, "
                                          f"about 20 s): {waited:.0f} s…</p>", refresh=True))
                return
            self._send(404, _page("ReirradiationNPC review", "<p>not found; open / </p>"))

    return Handler


def serve_per_viewer(results_dir, port: int = 8080, host: str = "127.0.0.1", max_viewers: int = 4,
                     echo=print, command: list | None = None) -> None:
    """Serve the launcher until interrupted (Ctrl-C or SIGTERM); stops every viewer's server on the way out."""
    launcher = Launcher(Path(results_dir), host, max_viewers, command)
    httpd = ThreadingHTTPServer((host, port), _handler(launcher))
    httpd.daemon_threads = True

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
